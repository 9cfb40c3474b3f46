//! Finding a file's or block device's size and direct-I/O geometry.

use crate::error::BdevError;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// What the bdev needs to know about the file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Size in bytes.
    pub(crate) size: u64,
    /// Smallest block size direct I/O accepts (offset and length alignment).
    pub(crate) dio_block: u32,
    /// Buffer address alignment direct I/O needs.
    pub(crate) dio_mem_align: u32,
    /// Whether it is a block device.
    pub(crate) is_block_device: bool,
    /// Whether its data lives only in memory (tmpfs, ramfs): nothing to write back.
    pub(crate) memory_backed: bool,
}

/// Whether the file lives on a filesystem with no backing store.
fn memory_backed(f: &File) -> bool {
    use nix::sys::statfs::{fstatfs, FsType, TMPFS_MAGIC};
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    fstatfs(f).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn statx_dio(f: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data (integers); all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: fd is open, the path is a valid C string, stx is a valid out-pointer.
    let r = unsafe {
        libc::statx(
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align.max(1)))
}

/// Probes an open file.
pub(crate) fn probe(f: &File, path: &Path) -> Result<Geometry, BdevError> {
    let md = f
        .metadata()
        .map_err(|e| BdevError::os(format!("stat {}", path.display()), e))?;
    let ft = md.file_type();
    if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) } != 0 {
            return Err(BdevError::os(
                format!("BLKGETSIZE64 on {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        if unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut ssz as *mut libc::c_int) } != 0 {
            return Err(BdevError::os(
                format!("BLKSSZGET on {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let block = u32::try_from(ssz).ok().filter(|b| *b >= 512).unwrap_or(512);
        let (dio_block, mem) = statx_dio(f).unwrap_or((block, 512));
        return Ok(Geometry {
            size,
            dio_block: dio_block.max(block),
            dio_mem_align: mem,
            is_block_device: true,
            memory_backed: false,
        });
    }
    if !ft.is_file() {
        return Err(BdevError::InvalidParam(format!(
            "filename: {} is neither a regular file nor a block device",
            path.display()
        )));
    }
    let (dio_block, mem) = statx_dio(f).unwrap_or((512, 512));
    Ok(Geometry {
        size: md.len(),
        dio_block,
        dio_mem_align: mem,
        is_block_device: false,
        memory_backed: memory_backed(f),
    })
}

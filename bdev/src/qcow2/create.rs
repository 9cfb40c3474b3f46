//! Creating images, as `qemu-img create -f qcow2 [-o ...] [-b B -F F]` does.

use super::format::{plan_create, put64, CreateLayout, COMPRESSION_ZLIB, COMPRESSION_ZSTD};
use crate::lock::{ImageLock, LockMode};
use crate::uring::{UringBdev, UringOptions};
use crate::{channel, write_at, Bdev, BdevError, DmaBuf, IoType};
use std::path::Path;
use std::sync::Arc;

/// Options of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// qcow2 version: 3 (`compat=1.1`, the default) or 2 (`compat=0.10`).
    pub version: u32,
    /// Refcount width in bits: 1, 2, 4, 8, 16 (default), 32 or 64.
    pub refcount_bits: u32,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format (`qcow2`, `raw`).
    pub backing_format: Option<String>,
    /// Compression type for compressed clusters: `zlib` (default) or `zstd`.
    pub compression_type: String,
    /// Extended L2 entries: not supported (refused with an error).
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            compression_type: "zlib".into(),
            extended_l2: false,
        }
    }
}

impl CreateOptions {
    /// Options for an image of `size` bytes, otherwise default.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            ..Self::default()
        }
    }
}

/// Checks every option of `opts` (nothing is touched): the image's layout,
/// its cluster bits and refcount order.
fn plan(opts: &CreateOptions) -> Result<(CreateLayout, u32, u32), BdevError> {
    let bad = |m: String| BdevError::InvalidParam(m);
    if opts.extended_l2 {
        return Err(BdevError::Unsupported(
            "extended L2 entries (subclusters) are not supported".into(),
        ));
    }
    if !opts.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&opts.cluster_size) {
        return Err(bad(format!(
            "cluster_size {} must be a power of two from 512 to 2097152",
            opts.cluster_size
        )));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(bad(format!(
            "refcount_bits {} must be a power of two up to 64",
            opts.refcount_bits
        )));
    }
    let ctype = match opts.compression_type.as_str() {
        "zlib" => COMPRESSION_ZLIB,
        "zstd" => COMPRESSION_ZSTD,
        o => return Err(bad(format!("compression_type {o:?} (zlib or zstd)"))),
    };
    let bits = opts.cluster_size.trailing_zeros();
    let order = opts.refcount_bits.trailing_zeros();
    let layout = plan_create(
        opts.size,
        bits,
        opts.version,
        order,
        ctype,
        opts.backing_file.as_deref(),
        opts.backing_format.as_deref(),
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok((layout, bits, order))
}

/// Writes a new, empty qcow2 image at the start of `base`. Call on a reactor.
pub async fn create(base: Arc<dyn Bdev>, opts: &CreateOptions) -> Result<(), BdevError> {
    let (layout, bits, order) = plan(opts)?;
    let bad = |m: String| BdevError::InvalidParam(m);
    let cs = opts.cluster_size;
    if (base.block_size() as u64) > cs {
        return Err(bad(format!(
            "cluster size {cs} is smaller than the block size of {}",
            base.name()
        )));
    }
    if base.size() < layout.image_len() {
        return Err(BdevError::Io(crate::IoStatus::Enospc));
    }
    let ch = channel(&base)?;
    let h = &layout.header;
    write_at(
        &ch,
        0,
        DmaBuf::from_slice(&h.to_cluster().map_err(|e| bad(e.to_string()))?)?,
    )
    .await?;
    let mut table = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
    for (i, &b) in layout.refblocks.iter().enumerate() {
        put64(&mut table, i * 8, b);
    }
    write_at(&ch, h.refcount_table_offset, DmaBuf::from_slice(&table)?).await?;
    let rf = super::format::RefcountFormat {
        order,
        cluster_bits: bits,
    };
    let e = rf.block_entries();
    for (j, &off) in layout.refblocks.iter().enumerate() {
        let mut blk = vec![0u8; cs as usize];
        let first = j as u64 * e;
        for c in first..(first + e).min(layout.clusters) {
            rf.set(&mut blk, c - first, 1)
                .map_err(|e| bad(e.to_string()))?;
        }
        write_at(&ch, off, DmaBuf::from_slice(&blk)?).await?;
    }
    if h.l1_size > 0 {
        let l1_len = (h.l1_size as u64 * 8).next_multiple_of(cs);
        write_at(&ch, h.l1_table_offset, DmaBuf::new(l1_len as usize)?).await?;
    }
    let st = crate::simple_io(&ch, IoType::Flush, 0, 0).await;
    if !st.is_ok() && st != crate::IoStatus::Unsupported {
        return Err(BdevError::Io(st));
    }
    tracing::info!(
        bdev = base.name(),
        size = opts.size,
        cluster_size = cs,
        "qcow2 image created"
    );
    Ok(())
}

/// Creates the file at `path` (replacing it) holding a new qcow2 image. Call on a reactor.
///
/// Every option is checked before the file is touched. Then the file is
/// opened (created if missing, never truncated yet) and locked as QEMU's
/// `raw_co_create` locks it (write and resize, resizes not shared) unless
/// `locking` is off: a file open for writing or reading, here or in another
/// process, is refused untouched with [`BdevError::Locked`]. The lock is held
/// until the image is written.
pub async fn create_file(path: &Path, opts: &CreateOptions) -> Result<(), BdevError> {
    create_file_locking(path, opts, LockMode::Auto).await
}

/// [`create_file`] with the file node's `locking` option.
pub async fn create_file_locking(
    path: &Path,
    opts: &CreateOptions,
    locking: LockMode,
) -> Result<(), BdevError> {
    let (layout, bits, _) = plan(opts)?;
    let image_len = layout.image_len();
    let l1 = super::format::Header::l1_entries_for(opts.size, bits) * 8;
    // Enough for header, tables and blocks; `create` checks the exact need.
    let len =
        (opts.cluster_size * 16 + l1 * 4 + (1 << 20)).next_multiple_of(opts.cluster_size.max(4096));
    let f = crate::open_checked::open_checked(
        path,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        libc::O_CLOEXEC,
        "creating",
    )?;
    let md = f
        .metadata()
        .map_err(|e| BdevError::os(format!("reading {}", path.display()), e))?;
    if !md.is_file() {
        return Err(BdevError::InvalidParam(format!(
            "filename: {} is not a regular file",
            path.display()
        )));
    }
    let _lock = if locking.enabled() {
        Some(ImageLock::for_create(&f, path)?)
    } else {
        None
    };
    f.set_len(0)
        .and_then(|_| f.set_len(len))
        .map_err(|e| BdevError::os(format!("sizing {}", path.display()), e))?;
    let base = UringBdev::open_under_lock(
        "qcow2-create",
        path,
        UringOptions {
            direct: false,
            read_only: false,
            block_size: Some(512),
            locking,
        },
    )?;
    let r = create(base.clone(), opts).await;
    crate::drop_cached_channels(&(base as Arc<dyn Bdev>));
    r?;
    // Trim to the image's real length, as qemu-img leaves it.
    f.set_len(image_len)
        .map_err(|e| BdevError::os(format!("trimming {}", path.display()), e))?;
    Ok(())
}

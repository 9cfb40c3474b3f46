//! FUA on the uring bdev over a buffered file, observed in the page cache
//! with `cachestat(2)`: a FUA write leaves no dirty page in its range
//! (`RWF_DSYNC`), and a FUA write-zeroes or discard (`fallocate`) is followed
//! by `fdatasync`, which leaves no dirty page in the whole file; without FUA
//! the dirty pages stay.

mod qcow2_common;

use bdev::uring::{UringBdev, UringOptions};
use bdev::{channel, submit_wait, Bdev, BdevIo, DmaBuf, IoStatus, IoType};
use qcow2_common::{runtime, scratch};
use reactor::RuntimeHandle;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

const K64: u64 = 64 << 10;

/// `cachestat`'s number (the same on every architecture; not in `libc` for all).
const SYS_CACHESTAT: libc::c_long = 451;

/// `(nr_dirty, nr_writeback)` pages of `[off, off+len)` of the file (`len`
/// 0: to its end), or `None` when the kernel has no `cachestat` (before 6.5).
fn dirty(path: &Path, off: u64, len: u64) -> Option<(u64, u64)> {
    let f = std::fs::File::open(path).expect("open");
    let range: [u64; 2] = [off, len];
    // nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted.
    let mut st = [0u64; 5];
    // SAFETY: `range` and `st` are the kernel's `struct cachestat_range` and
    // `struct cachestat` (all u64 fields), live for the call; the fd is open.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            range.as_ptr(),
            st.as_mut_ptr(),
            0u32,
        )
    };
    (r == 0).then_some((st[1], st[2]))
}

fn io(rt: &RuntimeHandle, b: &Arc<dyn Bdev>, t: IoType, off: u64, fua: bool) -> IoStatus {
    let b = b.clone();
    rt.spawn_on(0, move || async move {
        let ch = channel(&b).expect("channel");
        let buf =
            (t == IoType::Write).then(|| DmaBuf::from_slice(&[0x77u8; K64 as usize]).unwrap());
        let mut io = BdevIo::new(t, off, K64, buf, None);
        io.fua = fua;
        submit_wait(&ch, io).await.status
    })
    .block()
    .expect("join")
}

/// Dirties the first 64 KiB of the file with a plain write; true once the
/// page cache shows them dirty.
fn make_dirty(rt: &RuntimeHandle, b: &Arc<dyn Bdev>, path: &Path) -> bool {
    assert_eq!(io(rt, b, IoType::Write, 0, false), IoStatus::Success);
    dirty(path, 0, 0).is_some_and(|(d, _)| d > 0)
}

#[test]
fn uring_fua_is_durable_in_the_page_cache() {
    let d = scratch("uring-fua");
    let path = d.join("disk.raw");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create file");
    if dirty(&path, 0, 0).is_none() {
        println!("skipped: the kernel has no cachestat(2) (Linux 6.5+)");
        return;
    }
    let fs = nix::sys::statfs::statfs(&path).expect("statfs");
    if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        println!("skipped: {} is on tmpfs (no writeback)", d.display());
        return;
    }
    let rt = runtime(1);
    let h = rt.handle();
    let opts = UringOptions {
        direct: false,
        ..UringOptions::default()
    };
    let b: Arc<dyn Bdev> = UringBdev::open("fua_uring", &path, opts).expect("open");
    // A FUA write: its own range is clean at completion.
    assert!(
        make_dirty(&h, &b, &path),
        "a plain write left no dirty page"
    );
    assert_eq!(io(&h, &b, IoType::Write, 1 << 20, true), IoStatus::Success);
    assert_eq!(dirty(&path, 1 << 20, K64), Some((0, 0)), "FUA write");
    // Plain write-zeroes / discard: the earlier dirty pages stay dirty.
    for t in [IoType::WriteZeroes, IoType::Unmap] {
        assert!(
            make_dirty(&h, &b, &path),
            "a plain write left no dirty page"
        );
        assert_eq!(io(&h, &b, t, 2 << 20, false), IoStatus::Success);
        assert!(
            dirty(&path, 0, 0).is_some_and(|(d, _)| d > 0),
            "{t:?} without FUA synced the file"
        );
    }
    // FUA write-zeroes / discard: the file is synced before completion.
    for t in [IoType::WriteZeroes, IoType::Unmap] {
        assert!(
            make_dirty(&h, &b, &path),
            "a plain write left no dirty page"
        );
        assert_eq!(io(&h, &b, t, 3 << 20, true), IoStatus::Success);
        assert_eq!(dirty(&path, 0, 0), Some((0, 0)), "{t:?} with FUA");
    }
}

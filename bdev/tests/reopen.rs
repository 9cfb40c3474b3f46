//! Reopening a node in place (`Bdev::reopen`, QEMU's
//! `bdrv_reopen_set_read_only`): a uring file and a qcow2 image opened
//! read-only become writable on every reactor that already had a channel
//! to them (the io_uring's registered copy of the file included), with a
//! writer's lock, and go back to read-only with a reader's; the image is
//! whole after it (qemu-img check, contents through qemu-img). The lock
//! moves with the file: one descriptor on it throughout, its bytes
//! keeping others out (a reopen read-write while another reader holds the
//! file is refused and changes nothing) and letting them in again after.

mod qcow2_common;

use bdev::lock::{ImageLock, Perms};
use bdev::qcow2::OpenOptions;
use bdev::uring::{UringBdev, UringOptions};
use bdev::{channel, read_at, write_at, Bdev, BdevError, DmaBuf};
use qcow2_common::{opts, qemu_check, qemu_contents, qemu_img_create, qemu_io, runtime, scratch};
use reactor::RuntimeHandle;
use std::sync::Arc;

const REACTORS: usize = 2;

/// A write of 4 KiB of `byte` at `off` through reactor `r`'s channel.
fn try_write(
    rt: &RuntimeHandle,
    r: usize,
    b: &Arc<dyn Bdev>,
    off: u64,
    byte: u8,
) -> Result<(), BdevError> {
    let b = b.clone();
    rt.spawn_on(r, move || async move {
        let ch = channel(&b)?;
        write_at(&ch, off, DmaBuf::from_slice(&[byte; 4096])?)
            .await
            .map(drop)
    })
    .block()
    .expect("join")
}

/// Reads 4 KiB at `off` on every reactor (so each has a cached channel).
fn read_everywhere(rt: &RuntimeHandle, b: &Arc<dyn Bdev>, off: u64) -> Vec<Vec<u8>> {
    (0..REACTORS)
        .map(|r| {
            let b = b.clone();
            rt.spawn_on(r, move || async move {
                let ch = channel(&b).expect("channel");
                read_at(&ch, off, 4096)
                    .await
                    .expect("read")
                    .as_slice()
                    .to_vec()
            })
            .block()
            .expect("join")
        })
        .collect()
}

fn reopen(rt: &RuntimeHandle, b: &Arc<dyn Bdev>, read_only: bool) -> Result<(), BdevError> {
    let b2 = b.clone();
    let r = rt
        .spawn_on(0, move || async move {
            b2.reopen(read_only).expect("can reopen").await
        })
        .block()
        .expect("join");
    for x in rt.broadcast(bdev::refresh_channel_sizes).block() {
        x.expect("refresh");
    }
    r
}

/// The descriptors this process holds on `path`.
fn fds_on(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        .count()
}

/// Another holder's lock on `path`, through a descriptor of its own (as
/// another process would take it).
fn other_lock(path: &std::path::Path, perms: Perms) -> Result<ImageLock, BdevError> {
    let f = std::fs::File::open(path).expect("open the file to lock it");
    ImageLock::on_file(Arc::new(f), path, perms)
}

/// Another holder's reader lock on `path` (as `qemu-io -r` would take).
fn other_reader(path: &std::path::Path) -> Result<ImageLock, BdevError> {
    other_lock(path, Perms::READER)
}

#[test]
fn a_file_opened_read_only_is_written_after_a_reopen_on_every_reactor() {
    let d = scratch("reopen-file");
    let path = d.join("disk.raw");
    std::fs::write(&path, vec![0x11u8; 1 << 20]).expect("create file");
    let rt = runtime(REACTORS);
    let h = rt.handle();
    let o = UringOptions {
        direct: false,
        read_only: true,
        ..UringOptions::default()
    };
    let u = UringBdev::open("f0", &path, o).expect("open");
    let b: Arc<dyn Bdev> = u.clone();
    assert!(read_everywhere(&h, &b, 0)
        .iter()
        .all(|x| x == &vec![0x11u8; 4096]));
    assert!(
        try_write(&h, 0, &b, 0, 0x22).is_err(),
        "read-only file written"
    );
    assert_eq!(b.lock_perms(), Some(Perms::READER));
    assert_eq!(fds_on(&path), 1, "descriptors on the file");

    // Another reader keeps the writer out: refused, nothing changes.
    let r = other_reader(&path).expect("a second reader");
    match reopen(&h, &b, false) {
        Err(BdevError::Locked { message, .. }) => {
            assert_eq!(message, "Failed to get \"write\" lock")
        }
        other => panic!("reopen read-write under a reader: {other:?}"),
    }
    assert!(b.read_only());
    assert_eq!(b.lock_perms(), Some(Perms::READER));
    assert!(
        try_write(&h, 1, &b, 0, 0x22).is_err(),
        "written after a refusal"
    );
    drop(r);

    reopen(&h, &b, false).expect("reopen read-write");
    assert!(!b.read_only());
    assert_eq!(b.lock_perms(), Some(Perms::WRITER));
    assert_eq!(fds_on(&path), 1, "descriptors on the file");
    assert!(
        matches!(other_reader(&path), Err(BdevError::Locked { .. })),
        "a reader got in beside the writer"
    );
    for r in 0..REACTORS {
        // Through each reactor's ring, whose registered file was the
        // read-only one.
        try_write(&h, r, &b, 4096 * r as u64, 0x22 + r as u8)
            .unwrap_or_else(|e| panic!("write on reactor {r} after the reopen: {e}"));
    }
    let disk = std::fs::read(&path).expect("read file");
    assert_eq!(&disk[..4096], &[0x22u8; 4096][..]);
    assert_eq!(&disk[4096..8192], &[0x23u8; 4096][..]);

    reopen(&h, &b, true).expect("reopen read-only");
    assert!(b.read_only());
    assert_eq!(b.lock_perms(), Some(Perms::READER));
    assert_eq!(fds_on(&path), 1, "descriptors on the file");
    // The writer's bytes went with the old open file.
    let r = other_reader(&path).expect("a reader beside a reader");
    drop(r);
    assert!(
        try_write(&h, 1, &b, 0, 0x33).is_err(),
        "written after going back"
    );
    assert_eq!(read_everywhere(&h, &b, 0)[1], vec![0x22u8; 4096]);
    drop(b);
    drop(u);
    rt.shutdown();
}

#[test]
fn an_image_opened_read_only_is_written_after_a_reopen_and_trimmed_after() {
    let d = scratch("reopen-qcow2");
    let path = d.join("img.qcow2");
    qemu_img_create(&path, "4M", &[]);
    qemu_io(&path, &["write -P 0x11 0 1M"]);
    let len_before = std::fs::metadata(&path).expect("stat").len();
    let rt = runtime(REACTORS);
    let h = rt.handle();
    let q = qcow2_common::open(
        &h,
        "img",
        &path,
        OpenOptions {
            read_only: true,
            ..opts()
        },
    )
    .expect("open read-only");
    let b: Arc<dyn Bdev> = q.clone();
    read_everywhere(&h, &b, 0);
    assert!(
        try_write(&h, 1, &b, 2 << 20, 0x22).is_err(),
        "read-only image written"
    );

    assert_eq!(fds_on(&path), 1, "descriptors on the image");
    assert_eq!(b.lock_perms(), Some(Perms::READER));

    reopen(&h, &b, false).expect("reopen read-write");
    assert!(!b.read_only() && !q.base().read_only());
    // The image's lock moved to the writable file as it was (its caller
    // raises it): one descriptor, readers still welcome, writers not.
    assert_eq!(fds_on(&path), 1, "descriptors on the image");
    assert_eq!(b.lock_perms(), Some(Perms::READER));
    drop(other_reader(&path).expect("a reader beside the image"));
    assert!(
        matches!(
            other_lock(&path, Perms::WRITER),
            Err(BdevError::Locked { .. })
        ),
        "a writer got in beside the image"
    );
    // New clusters (past the file's old end) from both reactors.
    try_write(&h, 0, &b, 2 << 20, 0x22).expect("write on the owner");
    try_write(&h, 1, &b, 3 << 20, 0x33).expect("write from the other reactor");

    reopen(&h, &b, true).expect("reopen read-only");
    assert!(b.read_only() && q.base().read_only());
    assert_eq!(fds_on(&path), 1, "descriptors on the image");
    assert_eq!(b.lock_perms(), Some(Perms::READER));
    assert!(
        try_write(&h, 0, &b, 0, 0x44).is_err(),
        "written after going back"
    );
    let (rc, out) = qemu_check(&path);
    assert_eq!(rc, 0, "{out}");
    let len_after = std::fs::metadata(&path).expect("stat").len();
    assert!(
        len_after < len_before + (4 << 20),
        "file not trimmed: {len_before} -> {len_after}"
    );
    let c = qemu_contents(&path);
    assert!(c[..1 << 20].iter().all(|&x| x == 0x11));
    assert!(c[2 << 20..(2 << 20) + 4096].iter().all(|&x| x == 0x22));
    assert!(c[3 << 20..(3 << 20) + 4096].iter().all(|&x| x == 0x33));
    drop(b);
    drop(q);
    rt.shutdown();
    // The image's lock ended with it (its reactors' channels gone too).
    drop(other_lock(&path, Perms::WRITER).expect("a writer after the image is gone"));
}

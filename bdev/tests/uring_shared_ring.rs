//! Every uring bdev's channel on a reactor shares one io_uring (SPDK's group
//! channel): opening channels to many files on a reactor adds one ring and
//! one eventfd to the process, not one per file; completions reach the
//! channel (and request) that submitted them while requests of many files
//! are in flight on the one ring; the ring outlives channels that go while
//! others still use it, and goes with the last one.
//!
//! The only test in its file (its own process), so no other test's rings
//! are counted.

mod qcow2_common;

use bdev::uring::{UringBdev, UringOptions};
use bdev::{channel, drop_cached_channels, read_at, write_at, Bdev, DmaBuf};
use qcow2_common::{runtime, scratch};
use reactor::RuntimeHandle;
use std::sync::Arc;

const FILES: usize = 12;

/// (io_uring, eventfd) descriptors this process holds.
fn ring_fds() -> (usize, usize) {
    let (mut rings, mut efds) = (0, 0);
    for e in std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .flatten()
    {
        match std::fs::read_link(e.path()) {
            Ok(l) if l.to_str() == Some("anon_inode:[io_uring]") => rings += 1,
            Ok(l) if l.to_str() == Some("anon_inode:[eventfd]") => efds += 1,
            _ => {}
        }
    }
    (rings, efds)
}

/// On reactor `r`: writes file `i`'s own pattern to 16 blocks of every
/// bdev, all in flight together, then reads them all back concurrently.
fn write_and_check(rt: &RuntimeHandle, r: usize, bdevs: &[Arc<dyn Bdev>], salt: u8) {
    let bdevs = bdevs.to_vec();
    rt.spawn_on(r, move || async move {
        let mut writes = Vec::new();
        for (i, b) in bdevs.iter().enumerate() {
            let ch = channel(b).expect("channel");
            for blk in 0..16u64 {
                let byte = (i as u8).wrapping_mul(31).wrapping_add(blk as u8) ^ salt;
                let buf = DmaBuf::from_slice(&[byte; 4096]).expect("buf");
                let ch = ch.clone();
                writes.push(async move { write_at(&ch, blk * 4096, buf).await });
            }
        }
        for w in futures::future::join_all(writes).await {
            w.expect("write");
        }
        let mut reads = Vec::new();
        for (i, b) in bdevs.iter().enumerate() {
            let ch = channel(b).expect("channel");
            for blk in 0..16u64 {
                let ch = ch.clone();
                reads.push(async move { (i, blk, read_at(&ch, blk * 4096, 4096).await) });
            }
        }
        for (i, blk, r) in futures::future::join_all(reads).await {
            let want = (i as u8).wrapping_mul(31).wrapping_add(blk as u8) ^ salt;
            let got = r.expect("read");
            if got.as_slice().iter().any(|&x| x != want) {
                panic!(
                    "file {i} block {blk}: read {:?}, wrote {want}",
                    &got.as_slice()[..4]
                );
            }
        }
    })
    .block()
    .expect("join");
}

fn drop_channels(rt: &RuntimeHandle, r: usize, bdevs: &[Arc<dyn Bdev>]) {
    let bdevs = bdevs.to_vec();
    rt.spawn_on(r, move || async move {
        for b in &bdevs {
            drop_cached_channels(b);
        }
    })
    .block()
    .expect("join");
}

#[test]
fn channels_on_a_reactor_share_one_ring() {
    let dir = scratch("shared-ring");
    let rt = runtime(2);
    let h = rt.handle();
    let bdevs: Vec<Arc<dyn Bdev>> = (0..FILES)
        .map(|i| {
            let p = dir.join(format!("f{i}.img"));
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(1 << 20))
                .expect("create");
            // Half buffered, half O_DIRECT (buffered where the filesystem has no O_DIRECT).
            let direct = i % 2 == 0;
            let o = |direct| UringOptions {
                direct,
                ..UringOptions::default()
            };
            let b: Arc<dyn Bdev> = UringBdev::open(&format!("u{i}"), &p, o(direct))
                .or_else(|_| UringBdev::open(&format!("u{i}"), &p, o(false)))
                .expect("open");
            b
        })
        .collect();
    let base = ring_fds();

    write_and_check(&h, 0, &bdevs, 0);
    let one = ring_fds();
    if one != (base.0 + 1, base.1 + 1) {
        panic!(
            "{FILES} files' channels on one reactor: (rings, eventfds) {base:?} before, {one:?} after \
             (one ring and one eventfd expected)"
        );
    }

    // The other reactor gets its own ring, shared by its channels in turn.
    write_and_check(&h, 1, &bdevs, 0x55);
    let two = ring_fds();
    if two != (base.0 + 2, base.1 + 2) {
        panic!("channels on two reactors: (rings, eventfds) {base:?} before, {two:?} after");
    }

    // Half the files' channels go: the ring stays for the others, whose
    // requests still complete (and those channels come back on the same ring).
    drop_channels(&h, 0, &bdevs[..FILES / 2]);
    write_and_check(&h, 0, &bdevs[FILES / 2..], 0xa0);
    write_and_check(&h, 0, &bdevs, 0x0f);
    if ring_fds() != two {
        panic!("channels gone and back: {:?}, was {two:?}", ring_fds());
    }

    // The last channel on a reactor takes its ring with it.
    drop_channels(&h, 0, &bdevs);
    drop_channels(&h, 1, &bdevs);
    let none = ring_fds();
    if none != base {
        panic!("all channels gone: (rings, eventfds) {none:?}, {base:?} before any");
    }
    drop(bdevs);
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

//! A guest's virtqueue from outside bytes: the input is
//!
//! ```text
//! flags:u8 size:u8 base:u16le image[..]
//! ```
//!
//! `image` is the start of the guest's memory (region A, 64 KiB at guest
//! physical 0, a memfd; region B, 4 KiB right after it; nothing beyond), which
//! holds a split virtqueue of `1 << (size % 7)` entries: descriptor table at
//! 0x0, avail ring at 0x400 (its index says how many heads the guest offers
//! from `base` on), used ring at 0x800 (its index set to `base`, as a front end
//! leaves it), and anything else the descriptors point at: headers, data,
//! indirect tables, addresses outside memory, loops, wrong directions, huge
//! lengths, unknown request types and sectors. `flags`: bit 0 `EVENT_IDX`,
//! bit 1 a read-only export, bit 2 write-through.
//!
//! Driven through the crate's real code: `vublk::memory::GuestMem::map` over
//! the memfds as `SET_MEM_TABLE` maps them, and `vublk::vring::start` on the
//! process's reactor over a 1 MiB malloc bdev, kicked once, then stopped as
//! `GET_VRING_BASE` stops it. What must hold: no panic; within 5 s every
//! offered chain is returned to the used ring (with an error status where it
//! is bad), or the ring is declared broken and the connection shut; the ring
//! stops within 5 s; the device wrote no guest byte outside the used ring and
//! the buffers of write-only descriptors (of the table or of an indirect
//! table it names); and, unless broken, the next avail index it hands back
//! is `base` plus the heads offered. A guest whose write-only buffers overlap
//! the rings or an indirect table makes the device rewrite its own
//! instructions as it runs: that ring is held to no panic, no hang and a
//! bounded stop only.
#![no_main]

use bdev::Bdev;
use libfuzzer_sys::fuzz_target;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use sluice_fuzz::{on_reactor, HANG};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vublk::memory::GuestMem;
use vublk::vring::{self, DevShared, QueueCtl, QueueSetup};

const A_LEN: u64 = 64 << 10;
const B_LEN: u64 = 4 << 10;
const DESC: u64 = 0;
const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
const F_WRITE: u16 = 2;
/// How long a self-modifying ring is given before it is stopped.
const GRACE: std::time::Duration = std::time::Duration::from_millis(20);
const F_INDIRECT: u16 = 4;

fn node() -> Arc<dyn Bdev> {
    static N: OnceLock<Arc<dyn Bdev>> = OnceLock::new();
    N.get_or_init(|| bdev::malloc::MallocBdev::new("m0", 2048, 512, None).expect("malloc"))
        .clone()
}

fn memfd(len: u64, init: &[u8]) -> File {
    let mut f = File::from(memfd_create(c"guest", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd"));
    f.set_len(len).expect("memfd size");
    f.write_all(init).expect("memfd init");
    f
}

/// One descriptor of a table in `img` (the whole memory before the run).
fn desc(img: &[u8], at: u64) -> Option<(u64, u32, u16)> {
    let at = usize::try_from(at).ok()?;
    let d = img.get(at..at.checked_add(16)?)?;
    Some((
        u64::from_le_bytes(d[0..8].try_into().ok()?),
        u32::from_le_bytes(d[8..12].try_into().ok()?),
        u16::from_le_bytes(d[12..14].try_into().ok()?),
    ))
}

/// The guest ranges the device may write (the used ring with `avail_event`,
/// and every write-only descriptor's buffer, in the table or in an indirect
/// table one of its descriptors names), and the ranges the device reads its
/// instructions from (the rings and the indirect tables).
fn ranges(img: &[u8], size: u16) -> (Vec<(u64, u64)>, Vec<(u64, u64)>) {
    let n = u64::from(size);
    let used = (USED, USED + 6 + 8 * n);
    let mut out = vec![used];
    let mut rings = vec![(DESC, DESC + 16 * n), (AVAIL, AVAIL + 6 + 2 * n), used];
    let add = |out: &mut Vec<(u64, u64)>, (a, l, f): (u64, u32, u16)| {
        if f & F_WRITE != 0 {
            out.push((a, a.saturating_add(u64::from(l))));
        }
    };
    for i in 0..n {
        let Some(d) = desc(img, DESC + 16 * i) else {
            continue;
        };
        add(&mut out, d);
        if d.2 & F_INDIRECT != 0 {
            rings.push((d.0, d.0.saturating_add(u64::from(d.1))));
            // Only entries inside memory (a huge length names no more).
            let room = (img.len() as u64).saturating_sub(d.0) / 16;
            for j in 0..u64::from(d.1 / 16).min(room) {
                if let Some(e) = desc(img, d.0 + 16 * j) {
                    add(&mut out, e);
                }
            }
        }
    }
    (out, rings)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (flags, size) = (data[0], 1u16 << (data[1] % 7));
    let base = u16::from_le_bytes([data[2], data[3]]);
    let mut img = vec![0u8; (A_LEN + B_LEN) as usize];
    let n = (data.len() - 4).min(A_LEN as usize);
    img[..n].copy_from_slice(&data[4..4 + n]);
    img[USED as usize + 2..USED as usize + 4].copy_from_slice(&base.to_le_bytes());
    let regions = [
        VhostUserMemoryRegion::new(0, A_LEN, 0x7f00_0000_0000, 0),
        VhostUserMemoryRegion::new(A_LEN, B_LEN, 0x7f10_0000_0000, 0),
    ];
    let files = vec![
        memfd(A_LEN, &img[..A_LEN as usize]),
        memfd(B_LEN, &img[A_LEN as usize..]),
    ];
    let mem = Arc::new(GuestMem::map(&regions, files).expect("guest memory"));
    let offered =
        u16::from_le_bytes([img[AVAIL as usize + 2], img[AVAIL as usize + 3]]).wrapping_sub(base);
    let want = base.wrapping_add(offered);
    // A guest may point write-only buffers at the rings or an indirect table:
    // the device then rewrites its own instructions as it goes (legal for it
    // to follow, garbage for the guest), and the used index no longer counts
    // chains. Such a ring is held to no panic, no hang and stopping only.
    let (ok, rings) = ranges(&img, size);
    let self_modifying = ok[1..]
        .iter()
        .any(|&(s, e)| rings.iter().any(|&(rs, re)| s < re && rs < e));

    let mut q = Queue::new(vublk::blk::MAX_QUEUE_SIZE).expect("queue");
    q.try_set_size(size).expect("size");
    q.try_set_desc_table_address(GuestAddress(DESC))
        .expect("desc");
    q.try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail");
    q.try_set_used_ring_address(GuestAddress(USED))
        .expect("used");
    q.set_next_avail(base);
    q.set_next_used(base);
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    assert!(q.is_valid(&mem.mem), "the rings lie in memory");

    let (mut peer, conn) = UnixStream::pair().expect("socketpair");
    peer.set_nonblocking(true).expect("nonblocking");
    let mut id = [0u8; vublk::blk::ID_BYTES];
    id[..4].copy_from_slice(b"fuzz");
    let dev = Arc::new(DevShared {
        bdev: node(),
        writable: flags & 2 == 0,
        writeback: AtomicBool::new(flags & 4 == 0),
        id,
        conn,
        completed: AtomicU64::new(0),
        coalescing: Default::default(),
    });
    let kick = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).expect("kick");
    let kick = File::from(std::os::fd::OwnedFd::from(kick));
    let call = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).expect("call");
    let call = File::from(std::os::fd::OwnedFd::from(call));
    let ctl = Arc::new(QueueCtl::default());
    let setup = QueueSetup {
        queue: q,
        mem: mem.clone(),
        kick: kick.try_clone().expect("kick"),
        call: Some(call),
        // Held here too: the socket stays open while the ring's worker is
        // dropped, so that only the device's own shutdown reads as broken.
        dev: dev.clone(),
        ctl: ctl.clone(),
        index: 0,
    };
    on_reactor(move || async move { vring::start(setup) }).expect("ring start");
    (&kick).write_all(&1u64.to_ne_bytes()).expect("kick");

    // Wait for every offered chain to come back, or the ring to break.
    let is_broken = |peer: &mut UnixStream| {
        let mut b = [0u8; 1];
        match peer.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        }
    };
    let t0 = Instant::now();
    let broken = loop {
        let used = mem
            .mem
            .read_obj::<u16>(GuestAddress(USED + 2))
            .expect("used idx");
        if used == want {
            break false;
        }
        if is_broken(&mut peer) {
            break true;
        }
        if self_modifying && t0.elapsed() > GRACE {
            break false;
        }
        if t0.elapsed() > HANG {
            panic!(
                "{} of {offered} chains came back within {HANG:?}, and the ring is not broken",
                used.wrapping_sub(base)
            );
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    };
    if !broken && !self_modifying && offered > size {
        panic!("{offered} heads offered on a ring of {size}, and the ring is not broken");
    }

    // Stop it as GET_VRING_BASE does.
    ctl.stop.store(true, Ordering::Release);
    (&kick).write_all(&1u64.to_ne_bytes()).expect("kick");
    let t0 = Instant::now();
    while !ctl.done.load(Ordering::Acquire) {
        if t0.elapsed() > HANG {
            panic!("the ring did not stop within {HANG:?}");
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    let broken = broken || is_broken(&mut peer);
    let next = ctl.next_avail.load(Ordering::Acquire);
    if !broken && !self_modifying && next != want {
        panic!("the ring stopped at avail index {next}, not {want}");
    }

    // No byte written outside the used ring and write-only buffers.
    let mut after = vec![0u8; img.len()];
    mem.mem
        .read_slice(&mut after, GuestAddress(0))
        .expect("read memory");
    if self_modifying {
        return;
    }
    let inside = |s0: u64, e0: u64| ok.iter().any(|&(s, e)| s0 >= s && e0 <= e);
    // Chunks compared whole (memcmp), bytes only where a chunk differs.
    for (c, (a, b)) in img.chunks(64).zip(after.chunks(64)).enumerate() {
        let c0 = 64 * c as u64;
        if a == b || inside(c0, c0 + a.len() as u64) {
            continue;
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let g = c0 + i as u64;
            if x != y && !inside(g, g + 1) {
                panic!("the device wrote guest byte {g:#x} ({x:#x} -> {y:#x}), outside every buffer it may write");
            }
        }
    }
});

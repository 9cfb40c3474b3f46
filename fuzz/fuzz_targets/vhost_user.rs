//! The vhost-user-blk export's control socket from outside bytes: the input is
//! what a front end sends on one connection, as frames
//!
//! ```text
//! frame := kinds:u8 len:u16le bytes[len] { init:u16le bytes[init] }*
//! ```
//!
//! each sent with one `sendmsg`: `bytes` (vhost-user headers and payloads, cut
//! anywhere) with `kinds & 3` file descriptors attached (`SCM_RIGHTS`), fd *i*
//! a 64 KiB memfd when bit `2 + i` is set (its first `init` bytes from the
//! input, in order: guest memory a `SET_MEM_TABLE` may map, rings and requests
//! included), else an eventfd (a kick, call or error fd). Then the front end
//! hangs up.
//!
//! Driven through the crate's real code: `vublk::server::serve_connection`
//! (the vhost crate's `BackendReqHandler` over `vublk::backend::BlkBackend`)
//! on a thread of its own, as an export's control thread runs it, over a Unix
//! socket pair; rings it starts run on the process's reactor over a writable
//! 1 MiB malloc bdev with two queues offered. What must hold: no panic; the
//! connection ends (the socket is shut, and `serve_connection` returns)
//! within 5 s of the front end hanging up or of a message the device refuses,
//! whatever rings were running and requests in flight (that a refused message
//! ends it is the unit test `server::tests` in `vublk`).
#![no_main]

use bdev::Bdev;
use libfuzzer_sys::fuzz_target;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use sluice_fuzz::{rt, HANG};
use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use vublk::vring::DevShared;

/// Size of each memfd a frame attaches.
const MEMFD: u64 = 64 << 10;

/// The exported node, shared by every input (its data persists between them).
fn node() -> Arc<dyn Bdev> {
    static N: OnceLock<Arc<dyn Bdev>> = OnceLock::new();
    N.get_or_init(|| {
        // A front end that hangs up while the device writes a reply must not
        // kill the process: the service ignores SIGPIPE (Rust's runtime does
        // so before main; libFuzzer's main does not).
        // SAFETY: installs SIG_IGN, no handler code runs; done once, before
        // any socket of this process is written.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigIgn,
            )
        };
        bdev::malloc::MallocBdev::new("m0", 2048, 512, None).expect("malloc")
    })
    .clone()
}

/// A frame: bytes and the descriptors sent with them.
struct Frame {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Cuts the input into frames, making their file descriptors.
fn frames(mut data: &[u8]) -> Vec<Frame> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (a, b) = data.split_at(n.min(data.len()));
        *data = b;
        a
    }
    fn u16le(data: &mut &[u8]) -> usize {
        let b = take(data, 2);
        usize::from(b.first().copied().unwrap_or(0))
            | usize::from(b.get(1).copied().unwrap_or(0)) << 8
    }
    let mut out = Vec::new();
    while let Some((&kinds, rest)) = data.split_first() {
        data = rest;
        let len = u16le(&mut data);
        let bytes = take(&mut data, len).to_vec();
        let mut fds = Vec::new();
        for i in 0..(kinds & 3) {
            if kinds & (4 << i) != 0 {
                let fd = memfd_create(c"guest", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
                let mut f = File::from(fd);
                f.set_len(MEMFD).expect("memfd size");
                let init = u16le(&mut data);
                f.write_all(take(&mut data, init)).expect("memfd init");
                fds.push(OwnedFd::from(f));
            } else {
                let e = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .expect("eventfd");
                fds.push(OwnedFd::from(e));
            }
        }
        out.push(Frame { bytes, fds });
    }
    out
}

/// Sends the frames; stops at the first that the device does not take (it
/// dropped the connection), then hangs up.
fn send(s: UnixStream, frames: Vec<Frame>) {
    for f in frames {
        if f.bytes.is_empty() {
            continue; // a stream socket carries no descriptors without bytes
        }
        let raw: Vec<RawFd> = f.fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = if raw.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let mut at = 0;
        while at < f.bytes.len() {
            // Descriptors go with the first byte only.
            let c: &[ControlMessage] = if at == 0 { &cmsgs } else { &[] };
            match sendmsg::<UnixAddr>(
                s.as_raw_fd(),
                &[IoSlice::new(&f.bytes[at..])],
                c,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

fuzz_target!(|data: &[u8]| {
    let node = node();
    let frames = frames(data);
    let (front, back) = UnixStream::pair().expect("socketpair");
    front.set_read_timeout(Some(HANG)).expect("timeout");
    front.set_write_timeout(Some(HANG)).expect("timeout");
    let mut id = [0u8; vublk::blk::ID_BYTES];
    id[..4].copy_from_slice(b"fuzz");
    let dev = Arc::new(DevShared {
        bdev: node,
        writable: true,
        writeback: AtomicBool::new(true),
        id,
        conn: back.try_clone().expect("clone"),
        completed: AtomicU64::new(0),
        coalescing: Default::default(),
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let h = rt();
    let server = std::thread::spawn(move || {
        let why = vublk::server::serve_connection(dev, back, &h, 0, 2, 512);
        let _ = done_tx.send(why.map(|e| e.to_string()));
    });
    let w = front.try_clone().expect("clone");
    let writer = std::thread::spawn(move || send(w, frames));
    // Read the device's replies beside the writes, up to the connection's end.
    let t0 = Instant::now();
    let mut r = &front;
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!(
                    "the device did not end a connection whose front end hung up within {:?} ({} bytes sent)",
                    t0.elapsed(),
                    data.len()
                );
            }
            Err(_) => break,
        }
    }
    writer.join().expect("writer");
    // The socket is shut before serve_connection returns; it must return soon after.
    if done_rx.recv_timeout(HANG).is_err() {
        panic!("serve_connection did not return within {HANG:?} of ending the connection");
    }
    server.join().expect("server");
});

//! Clients' requests go ahead of a job's background requests
//! ([`bdev::BdevIo::background`]): on one connection the foreground read is
//! sent first and background ones are held back while it is in flight; with
//! multi-conn, background reads travel on a connection of their own, one at a
//! time over both connections while a client's read waits, and all at once
//! again when the client is quiet (`gate.rs`).
//!
//! A fake server (simple replies, no structured replies) logs every request
//! it receives, with the connection it came on, and answers the foreground
//! read (at [`FG_OFF`]) only after [`FG_DELAY`], noting how many requests
//! had arrived by then, and background ones after [`BG_DELAY`]; it counts
//! the background requests it holds (arrived, not yet answered) over all
//! connections, and the most it held while a foreground one waited.

use super::tests::{cfg, next_request, open, runtime, tmpdir};
use super::NbdBdev;
use crate::proto;
use bdev::{Bdev, BdevIo, DmaBuf, IoStatus};
use futures::future::{FutureExt, LocalBoxFuture};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The foreground read's offset (background reads are below it).
const FG_OFF: u64 = 512 << 10;
/// How long the server holds the foreground read's reply.
const FG_DELAY: Duration = Duration::from_millis(150);
/// How long the server holds each background read's reply.
const BG_DELAY: Duration = Duration::from_millis(3);
/// Background reads queued before the foreground one.
const BG_READS: u64 = 8;

/// What the server saw.
#[derive(Default)]
struct Log {
    /// (connection, offset) of each request, in arrival order.
    reqs: Vec<(usize, u64)>,
    /// The length of each background request, in arrival order.
    bg_lens: Vec<u32>,
    /// Requests that had arrived when the foreground reply went out.
    before_fg_reply: Option<usize>,
    /// Foreground requests held (arrived, not answered).
    fg_held: usize,
    /// Background requests held.
    bg_held: usize,
    /// The most background requests held while a foreground one was.
    max_bg_while_fg: usize,
    /// The most background requests held at once.
    max_bg: usize,
}

impl Log {
    /// A request arrived.
    fn arrived(&mut self, k: usize, offset: u64, len: u32) {
        self.reqs.push((k, offset));
        if offset == FG_OFF {
            self.fg_held += 1;
        } else {
            self.bg_held += 1;
            self.bg_lens.push(len);
        }
        self.max_bg = self.max_bg.max(self.bg_held);
        if self.fg_held > 0 {
            self.max_bg_while_fg = self.max_bg_while_fg.max(self.bg_held);
        }
    }

    /// A reply goes out.
    fn answered(&mut self, offset: u64) {
        if offset == FG_OFF {
            self.fg_held -= 1;
            self.before_fg_reply = Some(self.reqs.len());
        } else {
            self.bg_held -= 1;
        }
    }
}

/// The handshake up to `NBD_OPT_GO`, for an export of 1 MiB with `tflags`.
fn handshake(s: &mut UnixStream, tflags: u16) -> Option<()> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).ok()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).ok()?;
    loop {
        let mut oh = [0u8; 16];
        s.read_exact(&mut oh).ok()?;
        let o = proto::be32(&oh[8..12]);
        let mut data = vec![0u8; proto::be32(&oh[12..16]) as usize];
        s.read_exact(&mut data).ok()?;
        if o == proto::opt::GO {
            let mut d = proto::info::EXPORT.to_be_bytes().to_vec();
            d.extend_from_slice(&MIB.to_be_bytes());
            d.extend_from_slice(&(proto::tflags::HAS_FLAGS | tflags).to_be_bytes());
            let mut out = proto::option_reply(o, proto::rep::INFO, &d);
            out.extend(proto::option_reply(o, proto::rep::ACK, &[]));
            s.write_all(&out).ok()?;
            return Some(());
        }
        s.write_all(&proto::option_reply(o, proto::rep::ERR_UNSUP, &[]))
            .ok()?;
    }
}

/// Serves one connection: a reader logs requests and hands them to a
/// replier, which answers in order (the foreground read after [`FG_DELAY`]).
fn serve_conn(mut s: UnixStream, k: usize, tflags: u16, log: Arc<Mutex<Log>>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if handshake(&mut s, tflags).is_none() {
        return;
    }
    let Ok(mut w) = s.try_clone() else {
        return;
    };
    let (tx, rx) = mpsc::channel::<proto::Request>();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for r in rx {
            std::thread::sleep(if r.offset == FG_OFF {
                FG_DELAY
            } else {
                BG_DELAY
            });
            log2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .answered(r.offset);
            let mut v = proto::Head::simple(0, r.cookie).bytes().to_vec();
            v.extend((r.offset..r.offset + r.len as u64).map(pattern));
            if w.write_all(&v).is_err() {
                return;
            }
        }
    });
    loop {
        let Some(r) = next_request(&mut s) else {
            return;
        };
        if r.cmd != proto::cmd::READ {
            return;
        }
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .arrived(k, r.offset, r.len);
        if tx.send(r).is_err() {
            return;
        }
    }
}

/// The export's byte at `pos`.
fn pattern(pos: u64) -> u8 {
    (pos / 512 % 251) as u8
}

/// A fake server accepting any number of connections (numbered from 0).
fn fake_server(listener: UnixListener, tflags: u16) -> Arc<Mutex<Log>> {
    let log = Arc::new(Mutex::new(Log::default()));
    let l = log.clone();
    std::thread::spawn(move || {
        for (k, s) in listener.incoming().enumerate() {
            let Ok(s) = s else {
                return;
            };
            let l = l.clone();
            std::thread::spawn(move || serve_conn(s, k, tflags, l));
        }
    });
    log
}

/// A 4 KiB read at `off`, background or not; its status.
async fn read(ch: &bdev::IoChannel, off: u64, background: bool) -> IoStatus {
    let Ok(buf) = DmaBuf::new(4096) else {
        return IoStatus::Nomem;
    };
    let mut io = BdevIo::read(off, buf, None);
    io.background = background;
    bdev::submit_wait(ch, io).await.status
}

/// Queues [`BG_READS`] background reads and then one foreground read, all
/// before the connection's writer runs; every status.
async fn burst(ch: &bdev::IoChannel) -> Vec<IoStatus> {
    let mut all: Vec<LocalBoxFuture<'_, IoStatus>> = (0..BG_READS)
        .map(|i| read(ch, i * 4096, true).boxed_local())
        .collect();
    all.push(read(ch, FG_OFF, false).boxed_local());
    futures::future::join_all(all).await
}

fn run_on(rt: &reactor::RuntimeHandle, b: &Arc<NbdBdev>, prelude: bool) -> Vec<IoStatus> {
    let b: Arc<dyn Bdev> = b.clone();
    rt.spawn_on(0, move || async move {
        let ch = match bdev::channel(&b) {
            Ok(c) => c,
            Err(_) => return vec![IoStatus::Eio],
        };
        let mut st = Vec::new();
        if prelude {
            // The first background read makes the second connection; the
            // reads after it use it once it is up.
            st.push(read(&ch, 0, true).await);
            for _ in 0..100 {
                reactor::sleep(Duration::from_millis(10)).await;
            }
        }
        st.extend(burst(&ch).await);
        st
    })
    .block()
    .expect("join")
}

#[test]
fn one_connection_sends_the_foreground_read_first_and_holds_background_ones() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("prio1");
    let sock = dir.join("p.sock");
    let log = fake_server(UnixListener::bind(&sock).expect("bind"), 0);
    let b = open(&h, cfg(&sock, "x")).expect("open");
    let st = run_on(&h, &b, false);
    assert!(st.iter().all(|s| s.is_ok()), "statuses {st:?}");
    let l = log.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(l.reqs.len() as u64, BG_READS + 1, "{:?}", l.reqs);
    assert_eq!(
        l.reqs[0],
        (0, FG_OFF),
        "the foreground read goes first: {:?}",
        l.reqs
    );
    let before = l.before_fg_reply.expect("foreground reply");
    assert!(
        before <= 1 + super::gate::BG_WHILE_BUSY,
        "{before} requests sent while the foreground read was in flight: {:?}",
        l.reqs
    );
    drop(l);
    drop(b);
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn multi_conn_sends_background_reads_on_a_connection_of_their_own() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("prio2");
    let sock = dir.join("p.sock");
    let log = fake_server(
        UnixListener::bind(&sock).expect("bind"),
        proto::tflags::CAN_MULTI_CONN,
    );
    let b = open(&h, cfg(&sock, "x")).expect("open");
    let st = run_on(&h, &b, true);
    assert!(st.iter().all(|s| s.is_ok()), "statuses {st:?}");
    let l = log.lock().unwrap_or_else(|e| e.into_inner());
    // The prelude's read went on connection 0 (the second one was not up).
    assert_eq!(l.reqs.len() as u64, BG_READS + 2, "{:?}", l.reqs);
    let fg: Vec<_> = l.reqs.iter().filter(|r| r.1 == FG_OFF).collect();
    assert_eq!(fg, [&(0, FG_OFF)], "foreground on the first connection");
    let bg_on_1 = l.reqs.iter().filter(|r| r.0 == 1).count() as u64;
    assert_eq!(
        bg_on_1, BG_READS,
        "the burst's background reads on the second connection: {:?}",
        l.reqs
    );
    drop(l);
    drop(b);
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn multi_conn_sends_background_reads_one_at_a_time_while_a_client_reads() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("prio3");
    let sock = dir.join("p.sock");
    let log = fake_server(
        UnixListener::bind(&sock).expect("bind"),
        proto::tflags::CAN_MULTI_CONN,
    );
    let b = open(&h, cfg(&sock, "x")).expect("open");
    let st = run_on(&h, &b, true);
    assert!(st.iter().all(|s| s.is_ok()), "statuses {st:?}");
    {
        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            l.reqs.iter().any(|r| r.0 == 1),
            "background reads on the second connection: {:?}",
            l.reqs
        );
        assert!(
            l.max_bg_while_fg <= super::gate::BG_WHILE_BUSY,
            "{} background reads at the server, over both connections, while the \
             foreground read waited: {:?}",
            l.max_bg_while_fg,
            l.reqs
        );
        l.max_bg = 0;
    }
    // Once the client is quiet, the job's reads go together again.
    let bd: Arc<dyn Bdev> = b.clone();
    let st = h
        .spawn_on(0, move || async move {
            let ch = match bdev::channel(&bd) {
                Ok(c) => c,
                Err(_) => return vec![IoStatus::Eio],
            };
            reactor::sleep(super::gate::QUIET * 4).await;
            let all: Vec<LocalBoxFuture<'_, IoStatus>> = (0..BG_READS)
                .map(|i| read(&ch, i * 4096, true).boxed_local())
                .collect();
            futures::future::join_all(all).await
        })
        .block()
        .expect("join");
    assert!(st.iter().all(|s| s.is_ok()), "statuses {st:?}");
    let l = log.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        l.max_bg > super::gate::BG_WHILE_BUSY,
        "an idle client: background reads together ({} at most)",
        l.max_bg
    );
    drop(l);
    drop(b);
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_background_read_while_a_client_reads_goes_in_pieces() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("prio4");
    let sock = dir.join("p.sock");
    let log = fake_server(
        UnixListener::bind(&sock).expect("bind"),
        proto::tflags::CAN_MULTI_CONN,
    );
    let b = open(&h, cfg(&sock, "x")).expect("open");
    let bd: Arc<dyn Bdev> = b.clone();
    const BIG: u64 = 4 * super::split::BG_PIECE;
    // A big background read beside a waiting foreground read (its pieces on
    // the background connection, answered while the foreground one waits),
    // then (the client quiet) another: the statuses, and whether each read's
    // data is the export's.
    let r = h
        .spawn_on(0, move || async move {
            let ch = bdev::channel(&bd).ok()?;
            // The background connection, up.
            if !read(&ch, 0, true).await.is_ok() {
                return None;
            }
            for _ in 0..100 {
                reactor::sleep(Duration::from_millis(10)).await;
            }
            let big = |off: u64| {
                let ch = ch.clone();
                async move {
                    let mut io = BdevIo::read(off, DmaBuf::new(BIG as usize).ok()?, None);
                    io.background = true;
                    let mut io = bdev::submit_wait(&ch, io).await;
                    let buf = io.take_buf()?;
                    let same = buf
                        .as_slice()
                        .iter()
                        .enumerate()
                        .all(|(i, &x)| x == pattern(off + i as u64));
                    Some((io.status, same))
                }
            };
            let fg = read(&ch, FG_OFF, false).boxed_local();
            let (f, first) = futures::future::join(fg, big(0)).await;
            reactor::sleep(super::gate::QUIET * 4).await;
            let second = big(BIG).await;
            Some((f, first?, second?))
        })
        .block()
        .expect("join");
    let (f, first, second) = r.expect("reads");
    assert!(f.is_ok(), "{f:?}");
    assert_eq!(first, (IoStatus::Success, true), "the read in pieces");
    assert_eq!(second, (IoStatus::Success, true), "the read in one");
    let l = log.lock().unwrap_or_else(|e| e.into_inner());
    let p = super::split::BG_PIECE as u32;
    assert_eq!(
        l.bg_lens,
        [4096, p, p, p, p, BIG as u32],
        "pieces while the client read, one request once it was quiet: {:?}",
        l.reqs
    );
    drop(l);
    drop(b);
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

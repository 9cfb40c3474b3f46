//! The client against the crate's own server in-process (data, flush, zeroes,
//! block status, read-only exports, the handshake's errors) and against fake
//! servers that answer garbage at each step (the connection is dropped with a
//! clear error; nothing panics).

use super::{ClientConfig, NbdBdev, ServerAddr};
use crate::proto;
use crate::{ExportConfig, ListenAddr, NbdServer, StartOptions};
use bdev::{Bdev, BdevError, DmaBuf, IoStatus, IoType};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
static N: AtomicU32 = AtomicU32::new(0);

pub(super) fn tmpdir(tag: &str) -> PathBuf {
    let p = PathBuf::from(format!(
        "/tmp/sl-nbdcl-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

pub(super) fn runtime(cores: &str) -> Runtime {
    let mut cfg = RuntimeConfig::new(CoreSet::from_list(cores).expect("cores"));
    cfg.pin = false;
    Runtime::start(cfg).expect("runtime")
}

pub(super) fn cfg(sock: &Path, export: &str) -> ClientConfig {
    ClientConfig {
        server: ServerAddr::Unix(sock.to_path_buf()),
        export: Some(export.into()),
        reconnect_delay: Duration::ZERO,
        open_timeout: Duration::ZERO,
        tls_creds: None,
        tls_hostname: None,
        tls: None,
    }
}

pub(super) fn open(rt: &RuntimeHandle, c: ClientConfig) -> Result<Arc<NbdBdev>, BdevError> {
    rt.spawn_on(
        0,
        move || async move { NbdBdev::open("nbdc", c, false).await },
    )
    .block()
    .expect("join")
}

/// A server on a Unix socket exporting `bdev` as `name`.
/// A fake server's next request: `None` at the end of the stream, on garbage
/// or on `NBD_CMD_DISC`.
pub(super) fn next_request(s: &mut impl Read) -> Option<proto::Request> {
    let mut rq = [0u8; proto::REQUEST_LEN];
    s.read_exact(&mut rq).ok()?;
    proto::decode_request(&rq).filter(|r| r.cmd != proto::cmd::DISC)
}

fn serve(
    rt: &RuntimeHandle,
    dir: &Path,
    reg: &Arc<bdev::Registry>,
    bdev: Arc<dyn Bdev>,
    writable: bool,
) -> (NbdServer, PathBuf) {
    let name = bdev.name().to_string();
    reg.register(bdev).expect("register");
    let srv = NbdServer::default();
    let sock = dir.join("s.sock");
    srv.start(
        rt,
        None,
        &[ListenAddr::Unix(sock.clone())],
        StartOptions::default(),
    )
    .expect("start");
    srv.add_export(
        reg,
        ExportConfig {
            id: name.clone(),
            node: name.clone(),
            name,
            description: String::new(),
            writable,
            writethrough: false,
        },
    )
    .expect("export");
    (srv, sock)
}

/// Runs `f` with this reactor's channel to `b` on reactor `r`.
fn on<T: Send + 'static, F>(rt: &RuntimeHandle, r: usize, b: &Arc<NbdBdev>, f: F) -> T
where
    F: FnOnce(Arc<dyn Bdev>) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
{
    let b: Arc<dyn Bdev> = b.clone();
    rt.spawn_on(r, move || f(b)).block().expect("join")
}

#[test]
fn reads_writes_zeroes_flush_and_block_status_through_the_crates_server() {
    let rt = runtime("0,1");
    let h = rt.handle();
    let dir = tmpdir("rw");
    let reg = bdev::Registry::new();
    let m: Arc<dyn Bdev> =
        bdev::malloc::MallocBdev::new("m0", 8 * MIB / 512, 512, None).expect("malloc");
    let (srv, sock) = serve(&h, &dir, &reg, m.clone(), true);
    let b = open(&h, cfg(&sock, "m0")).expect("open");
    assert_eq!(b.size(), 8 * MIB);
    assert!(!b.read_only());
    assert!(b.export_info().structured);
    for r in [0usize, 1] {
        // Many requests in flight on each reactor's connection.
        let ok = on(&h, r, &b, move |b| {
            Box::pin(async move {
                let ch = bdev::channel(&b).expect("channel");
                let mut writes = Vec::new();
                for i in 0..64u64 {
                    let mut buf = DmaBuf::new(4096).expect("buf");
                    buf.as_mut_slice().fill((i as u8) ^ (r as u8 * 0x55));
                    let off = (r as u64 * 64 + i) * 4096;
                    let ch = ch.clone();
                    writes.push(async move { bdev::write_at(&ch, off, buf).await.is_ok() });
                }
                let all = futures::future::join_all(writes)
                    .await
                    .into_iter()
                    .all(|x| x);
                let fl = bdev::simple_io(&ch, IoType::Flush, 0, 0).await;
                let mut good = all && fl.is_ok();
                for i in 0..64u64 {
                    let off = (r as u64 * 64 + i) * 4096;
                    let got = bdev::read_at(&ch, off, 4096).await.expect("read");
                    good &= got
                        .as_slice()
                        .iter()
                        .all(|&x| x == (i as u8) ^ (r as u8 * 0x55));
                }
                good
            })
        });
        assert!(ok, "reactor {r}: data read back differs");
    }
    // The server sets NBD_FLAG_CAN_MULTI_CONN: one connection per reactor.
    assert!(b.export_info().has(proto::tflags::CAN_MULTI_CONN));
    assert_eq!(
        srv.exports()[0].connections,
        2,
        "multi-conn: a connection per reactor"
    );
    // The server's bdev holds what was written.
    let back = on(&h, 0, &b, {
        let m = m.clone();
        move |_| {
            Box::pin(async move {
                let ch = bdev::channel(&m).expect("channel");
                bdev::read_at(&ch, 65 * 4096, 4096)
                    .await
                    .expect("read")
                    .as_slice()
                    .to_vec()
            })
        }
    });
    assert!(back.iter().all(|&x| x == 1 ^ 0x55));
    // Write-zeroes and a write beyond the end.
    let (z, beyond) = on(&h, 0, &b, |b| {
        Box::pin(async move {
            let ch = bdev::channel(&b).expect("channel");
            let z = bdev::simple_io(&ch, IoType::WriteZeroes, 0, 8192).await;
            let got = bdev::read_at(&ch, 0, 8192).await.expect("read");
            let beyond = bdev::simple_io(&ch, IoType::Read, 8 * MIB, 512).await;
            (z.is_ok() && got.as_slice().iter().all(|&x| x == 0), beyond)
        })
    });
    assert!(z, "write-zeroes");
    assert_eq!(beyond, IoStatus::Einval);
    // Block status: the malloc export reports data everywhere, from the server.
    let st = on(&h, 1, &b, |b| {
        Box::pin(async move { b.range_status(0, 8 * MIB).expect("block status").await })
    })
    .expect("status");
    assert!(st.allocated && st.len > 0 && st.len <= 8 * MIB);
    // A job walks block status between its background reads: the queries
    // must not count as a client's requests, or the gate holds the job's
    // reads back as if a client were reading.
    let busy = h
        .spawn_on(1, {
            let b = b.clone();
            move || async move {
                let d: Arc<dyn Bdev> = b.clone();
                // Past the quiet time of this reactor's earlier reads.
                reactor::sleep(super::gate::QUIET * 4).await;
                for i in 0..4u64 {
                    let f = d.range_status(i * MIB, MIB).expect("block status");
                    f.await.expect("status");
                }
                b.client_busy_here()
            }
        })
        .block()
        .expect("join");
    assert_eq!(
        busy,
        Some(false),
        "block status queries made the gate count a busy client"
    );
    let fname = b.filename().expect("filename");
    assert_eq!(fname, format!("nbd+unix:///m0?socket={}", sock.display()));
    drop(b);
    srv.shutdown(Duration::from_secs(2));
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

/// A job's background read while a client reads without pause goes at the
/// busy rate (`split.rs`, `Gate::reserve`): 8 MiB at 64 MiB/s takes at least
/// 125 ms, whatever the machine; the client's reads go on meanwhile, and the
/// data is the export's.
#[test]
fn a_background_read_beside_a_client_reading_without_pause_is_paced() {
    use std::cell::Cell;
    use std::rc::Rc;
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("pace");
    let reg = bdev::Registry::new();
    let m: Arc<dyn Bdev> =
        bdev::malloc::MallocBdev::new("m0", 16 * MIB / 512, 512, None).expect("malloc");
    let (srv, sock) = serve(&h, &dir, &reg, m.clone(), true);
    let b = open(&h, cfg(&sock, "m0")).expect("open");
    const BIG: u64 = 8 * MIB;
    // The export's data: each 4 KiB block holds its number.
    let filled = on(&h, 0, &b, move |b| {
        Box::pin(async move {
            let ch = bdev::channel(&b).expect("channel");
            let mut ok = true;
            for m in 0..2 * BIG / MIB {
                let mut buf = DmaBuf::new(MIB as usize).expect("buf");
                for (i, c) in buf.as_mut_slice().chunks_mut(4096).enumerate() {
                    c.fill((m * 256 + i as u64) as u8);
                }
                ok &= bdev::write_at(&ch, m * MIB, buf).await.is_ok();
            }
            ok
        })
    });
    assert!(filled, "fill");
    let rate = super::split::BG_BUSY_RATE;
    let (took, fg_reads, good) = on(&h, 0, &b, move |b| {
        Box::pin(async move {
            let ch = bdev::channel(&b).expect("channel");
            let done = Rc::new(Cell::new(false));
            let client = {
                let (ch, done) = (ch.clone(), done.clone());
                async move {
                    let mut n = 0u64;
                    while !done.get() {
                        let off = BIG + (n % 256) * 4096;
                        let ok = bdev::read_at(&ch, off, 4096).await.is_ok();
                        assert!(ok, "client read");
                        n += 1;
                    }
                    n
                }
            };
            let job = async {
                // The client's first read is on its way before the job's.
                reactor::sleep(Duration::from_millis(2)).await;
                let t = std::time::Instant::now();
                let mut io = bdev::BdevIo::read(0, DmaBuf::new(BIG as usize).expect("buf"), None);
                io.background = true;
                let mut io = bdev::submit_wait(&ch, io).await;
                let took = t.elapsed();
                done.set(true);
                let good = io.status.is_ok()
                    && io.take_buf().is_some_and(|buf| {
                        buf.as_slice()
                            .chunks(4096)
                            .enumerate()
                            .all(|(i, c)| c.iter().all(|&x| x == i as u8))
                    });
                (took, good)
            };
            let (n, (took, good)) = futures::future::join(client, job).await;
            (took, n, good)
        })
    });
    assert!(good, "the paced read's data is the export's");
    let least = Duration::from_nanos(BIG * 1_000_000_000 / rate) - Duration::from_millis(2);
    assert!(
        took >= least,
        "{BIG} bytes in {took:?} beside a busy client: faster than the busy rate allows ({least:?})"
    );
    assert!(
        fg_reads >= 10,
        "the client went on meanwhile: {fg_reads} reads"
    );
    drop(b);
    srv.shutdown(Duration::from_secs(2));
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn read_only_export_and_handshake_refusals() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("ro");
    let reg = bdev::Registry::new();
    let m: Arc<dyn Bdev> =
        bdev::malloc::MallocBdev::new("r0", MIB / 512, 512, None).expect("malloc");
    let (srv, sock) = serve(&h, &dir, &reg, m, false);
    let b = open(&h, cfg(&sock, "r0")).expect("open");
    assert!(b.read_only());
    let st = on(&h, 0, &b, |b| {
        Box::pin(async move {
            let ch = bdev::channel(&b).expect("channel");
            bdev::simple_io(&ch, IoType::Write, 0, 512).await
        })
    });
    assert_eq!(st, IoStatus::ReadOnly);
    drop(b);
    let e = open(&h, cfg(&sock, "nope"))
        .err()
        .expect("unknown export")
        .to_string();
    assert!(e.contains("Requested export not available"), "{e}");
    let e = open(&h, cfg(&dir.join("none.sock"), "r0"))
        .err()
        .expect("nothing listening")
        .to_string();
    assert!(
        e.contains("Failed to connect to") && e.contains("No such file"),
        "{e}"
    );
    srv.shutdown(Duration::from_secs(2));
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

/// A bad reply to a read of 4096 bytes at 0 with `cookie`: kind 0 is plain
/// garbage, the others break one rule of structured replies each.
fn bad_reply(kind: usize, cookie: u64) -> Vec<u8> {
    let chunk = |flags: u16, ty: u16, cookie: u64, payload: &[u8], len: Option<u32>| {
        let mut v = proto::Head::chunk(flags, ty, cookie, len.unwrap_or(payload.len() as u32))
            .bytes()
            .to_vec();
        v.extend_from_slice(payload);
        v
    };
    let done = proto::chunk::FLAG_DONE;
    match kind {
        1 => proto::Head::simple(0, cookie ^ 0xdead).bytes().to_vec(),
        2 => chunk(
            done,
            proto::chunk::OFFSET_DATA,
            cookie,
            &[0; 8],
            Some(u32::MAX),
        ),
        3 => {
            let mut p = (1u64 << 40).to_be_bytes().to_vec();
            p.extend_from_slice(&[0; 16]);
            chunk(done, proto::chunk::OFFSET_DATA, cookie, &p, None)
        }
        4 => chunk(
            done,
            proto::chunk::ERROR,
            cookie,
            &[0, 0, 0, 5, 0xff, 0xff],
            None,
        ),
        5 => chunk(done, 77, cookie, &[], None),
        6 => chunk(0, proto::chunk::NONE, cookie, &[1, 2], None),
        7 => chunk(done, proto::chunk::ERROR, cookie, &[0, 0, 0, 0, 0, 0], None),
        8 => proto::Head::simple(0, cookie).bytes().to_vec(),
        _ => vec![0xa5; 64],
    }
}

/// Kinds of [`bad_reply`].
const BAD_REPLIES: usize = 9;

/// A fake server: a good handshake up to step `bad`, then garbage; with
/// `bad` past the handshake, reply `bad - 100` of [`bad_reply`].
fn fake_server(listener: UnixListener, bad: usize) {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let garbage = [0xa5u8; 64];
        let step = |s: &mut std::os::unix::net::UnixStream, k: usize, good: &[u8]| -> bool {
            if k == bad {
                let _ = s.write_all(&garbage);
                false
            } else {
                s.write_all(good).is_ok()
            }
        };
        let mut hello = Vec::new();
        hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        hello
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        if !step(&mut s, 0, &hello) {
            return;
        }
        let mut cf = [0u8; 4];
        if s.read_exact(&mut cf).is_err() {
            return;
        }
        // Options until GO.
        for k in 1..8 {
            let mut oh = [0u8; 16];
            if s.read_exact(&mut oh).is_err() {
                return;
            }
            let o = proto::be32(&oh[8..12]);
            let mut data = vec![0u8; proto::be32(&oh[12..16]) as usize];
            if s.read_exact(&mut data).is_err() {
                return;
            }
            let mut out = Vec::new();
            match o {
                proto::opt::STRUCTURED_REPLY => out = proto::option_reply(o, proto::rep::ACK, &[]),
                proto::opt::SET_META_CONTEXT => {
                    let mut d = 1u32.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    out.extend(proto::option_reply(o, proto::rep::META_CONTEXT, &d));
                    out.extend(proto::option_reply(o, proto::rep::ACK, &[]));
                }
                proto::opt::GO => {
                    let mut d = proto::info::EXPORT.to_be_bytes().to_vec();
                    d.extend_from_slice(&MIB.to_be_bytes());
                    d.extend_from_slice(
                        &(proto::tflags::HAS_FLAGS | proto::tflags::SEND_FLUSH).to_be_bytes(),
                    );
                    out.extend(proto::option_reply(o, proto::rep::INFO, &d));
                    out.extend(proto::option_reply(o, proto::rep::ACK, &[]));
                    if !step(&mut s, k, &out) {
                        return;
                    }
                    break;
                }
                _ => out = proto::option_reply(o, proto::rep::ERR_UNSUP, &[]),
            }
            if !step(&mut s, k, &out) {
                return;
            }
        }
        // Transmission: a bad reply to the first request.
        let mut rq = [0u8; proto::REQUEST_LEN];
        if s.read_exact(&mut rq).is_ok() {
            let _ = s.write_all(&bad_reply(bad.saturating_sub(100), proto::be64(&rq[8..16])));
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

#[test]
fn garbage_at_each_step_drops_the_connection_with_a_clear_error() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("garbage");
    for bad in 0..4 {
        let sock = dir.join(format!("g{bad}.sock"));
        fake_server(UnixListener::bind(&sock).expect("bind"), bad);
        let e = open(&h, cfg(&sock, "x"))
            .err()
            .expect("garbage handshake")
            .to_string();
        assert!(e.contains("NBD protocol error"), "step {bad}: {e}");
    }
    // Past the handshake, each kind of bad reply: with reconnect-delay 0 the
    // read fails with EIO (the connection is dropped; nothing listens any more).
    for kind in 0..BAD_REPLIES {
        let sock = dir.join(format!("gr{kind}.sock"));
        fake_server(UnixListener::bind(&sock).expect("bind"), 100 + kind);
        let b = open(&h, cfg(&sock, "x")).expect("open");
        let st = on(&h, 0, &b, |b| {
            Box::pin(async move {
                let ch = bdev::channel(&b).expect("channel");
                match bdev::read_at(&ch, 0, 4096).await {
                    Ok(_) => None,
                    Err(e) => Some(e.errno()),
                }
            })
        });
        assert_eq!(st, Some(libc::EIO), "bad reply kind {kind}");
        assert_eq!(
            b.driver_specific()["nbd"]["connections_dropped"],
            1,
            "bad reply kind {kind}: the connection is dropped"
        );
        drop(b);
    }
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

/// A server of the old kind: no structured replies, no `NBD_OPT_GO` (only
/// `NBD_OPT_EXPORT_NAME`, with the 124 zero bytes), simple replies; reads
/// return 0x42, everything else succeeds.
fn legacy_server(listener: UnixListener) {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut hello = Vec::new();
        hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
        if s.write_all(&hello).is_err() {
            return;
        }
        let mut cf = [0u8; 4];
        if s.read_exact(&mut cf).is_err() {
            return;
        }
        loop {
            let mut oh = [0u8; 16];
            if s.read_exact(&mut oh).is_err() {
                return;
            }
            let o = proto::be32(&oh[8..12]);
            let mut data = vec![0u8; proto::be32(&oh[12..16]) as usize];
            if s.read_exact(&mut data).is_err() {
                return;
            }
            if o == proto::opt::EXPORT_NAME {
                let mut v = MIB.to_be_bytes().to_vec();
                v.extend_from_slice(
                    &(proto::tflags::HAS_FLAGS | proto::tflags::SEND_FLUSH).to_be_bytes(),
                );
                v.extend_from_slice(&[0u8; 124]);
                if s.write_all(&v).is_err() {
                    return;
                }
                break;
            }
            if s.write_all(&proto::option_reply(o, proto::rep::ERR_UNSUP, &[]))
                .is_err()
            {
                return;
            }
        }
        loop {
            let Some(r) = next_request(&mut s) else {
                return;
            };
            if r.cmd == proto::cmd::WRITE {
                let mut sink = vec![0u8; r.len as usize];
                if s.read_exact(&mut sink).is_err() {
                    return;
                }
            }
            let mut v = proto::Head::simple(0, r.cookie).bytes().to_vec();
            if r.cmd == proto::cmd::READ {
                v.extend(std::iter::repeat_n(0x42u8, r.len as usize));
            }
            if s.write_all(&v).is_err() {
                return;
            }
        }
    });
}

#[test]
fn falls_back_to_export_name_and_simple_replies() {
    let rt = runtime("0");
    let h = rt.handle();
    let dir = tmpdir("legacy");
    let sock = dir.join("l.sock");
    legacy_server(UnixListener::bind(&sock).expect("bind"));
    let b = open(&h, cfg(&sock, "x")).expect("open");
    let info = b.export_info();
    assert!(!info.structured && info.meta_id.is_none(), "{info:?}");
    assert_eq!(b.size(), MIB);
    assert!(
        b.range_status(0, MIB).is_none(),
        "no block status without structured replies"
    );
    let (data, wrote, flushed) = on(&h, 0, &b, |b| {
        Box::pin(async move {
            let ch = bdev::channel(&b).expect("channel");
            let got = bdev::read_at(&ch, 4096, 8192).await.expect("read");
            let w = bdev::write_at(&ch, 0, DmaBuf::new(4096).expect("buf"))
                .await
                .is_ok();
            let f = bdev::simple_io(&ch, IoType::Flush, 0, 0).await;
            (got.as_slice().iter().all(|&x| x == 0x42), w, f)
        })
    });
    assert!(data && wrote && flushed.is_ok());
    drop(b);
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

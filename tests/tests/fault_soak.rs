//! Faults under load (issue #17): NBD connections doing verified I/O while
//! eight streams, an active commit and a mirror run, an RPC client polls the
//! jobs, and the test injects: EIO on reads of a stream's base image and
//! ENOSPC on writes into the commit's base (`bdev_error_inject_error` on
//! `bdev_error_create` bdevs under the images), a full file system under
//! the mirror's target (a small tmpfs; needs root, else that part is
//! skipped and says so), SIGSTOP / SIGCONT of the service, and SIGKILL
//! followed by a restart that replays the configuration `save_config`
//! wrote (`--json`).
//!
//! Each connection owns a region of one device and checks every write by
//! reading it back (each 512-byte sector carries its generation); a write
//! that failed may read as old or new; after the SIGKILL a block may read as
//! its last durable value (FUA, or written before an acknowledged flush) or
//! any later one, never anything else. Afterwards: every block verified,
//! every image `qemu-img check` clean (leaks allowed), and the service's
//! RSS and open descriptors, printed every period, flat across the run
//! after the restart.
//!
//! Default: 24 connections, about a minute. `SLUICE_SOAK=1`: 1,000
//! connections, about 8 minutes (bounded to 10).

use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, soak, Daemon, TempDir};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const BLOCK: u64 = 4096;
const SECTOR: usize = 512;
/// The byte every sector of the images starts as.
const INITIAL: u8 = 0x11;
/// Devices vd0..vd9: vd0..vd7 streamed, vd8 actively committed, vd9 mirrored.
const DEVICES: usize = 10;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---- a small NBD client that reports failures instead of panicking ----

struct Nbd {
    s: UnixStream,
    cookie: u64,
}

/// What a request came back with.
#[derive(Debug)]
enum Answer {
    Ok(Vec<u8>),
    /// The server's errno.
    Err(u32),
}

impl Nbd {
    /// Connects and negotiates `export` with NBD_OPT_EXPORT_NAME (simple replies).
    fn connect(sock: &Path, export: &str) -> std::io::Result<Nbd> {
        let mut s = UnixStream::connect(sock)?;
        // Long enough for a SIGSTOP of the service.
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if &g[0..8] != b"NBDMAGIC" {
            return Err(std::io::Error::other("bad greeting"));
        }
        // FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes())?;
        let mut o = Vec::new();
        o.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        o.extend_from_slice(&1u32.to_be_bytes());
        o.extend_from_slice(&(export.len() as u32).to_be_bytes());
        o.extend_from_slice(export.as_bytes());
        s.write_all(&o)?;
        let mut r = [0u8; 10];
        s.read_exact(&mut r)?;
        Ok(Nbd { s, cookie: 0 })
    }

    fn request(
        &mut self,
        flags: u16,
        ty: u16,
        off: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<Answer> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&ty.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.s.write_all(&h)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if r[0..4] != 0x6744_6698u32.to_be_bytes() || r[8..16] != self.cookie.to_be_bytes() {
            return Err(std::io::Error::other(format!("bad reply {r:?}")));
        }
        let err = u32::from_be_bytes(r[4..8].try_into().unwrap());
        if err != 0 {
            return Ok(Answer::Err(err));
        }
        let mut out = vec![0u8; if ty == 0 { len as usize } else { 0 }];
        self.s.read_exact(&mut out)?;
        Ok(Answer::Ok(out))
    }
}

// ---- the model ----

/// Sector `i` of `block` as generation `g` writes it (generation 0: the
/// initial contents).
fn sector(g: u64, block: u64, i: usize) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    if g == 0 {
        b.fill(INITIAL);
        return b;
    }
    b[..8].copy_from_slice(&g.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    for (k, x) in b[16..].iter_mut().enumerate() {
        *x = (g as u8) ^ (i as u8) ^ (k as u8);
    }
    b
}

fn block_data(g: u64, block: u64) -> Vec<u8> {
    (0..BLOCK as usize / SECTOR)
        .flat_map(|i| sector(g, block, i))
        .collect()
}

/// The generation of each sector of a block read back, if it is one.
fn generations(data: &[u8], block: u64) -> Vec<Option<u64>> {
    data.chunks(SECTOR)
        .enumerate()
        .map(|(i, c)| {
            if c.iter().all(|&x| x == INITIAL) {
                return Some(0);
            }
            let g = u64::from_le_bytes(c[..8].try_into().unwrap());
            (c == sector(g, block, i)).then_some(g)
        })
        .collect()
}

/// What one block may hold.
#[derive(Default, Clone)]
struct BlockState {
    /// What it may read as now (one value after an acknowledged write).
    now: BTreeSet<u64>,
    /// What it may hold after a power loss or a SIGKILL: the last durable
    /// values and every write attempted since.
    after_kill: BTreeSet<u64>,
}

/// Counts of one connection's work.
#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    writes: u64,
    write_errors: u64,
    /// Of those, ENOSPC.
    enospc: u64,
    reads_verified: u64,
    read_errors: u64,
    flushes: u64,
    reconnects: u64,
    kill_checks: u64,
}

struct Client {
    dev: usize,
    first: u64,
    blocks: u64,
    state: Vec<BlockState>,
    counts: Counts,
    rng: u64,
}

static GEN: AtomicU64 = AtomicU64::new(1);

impl Client {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    /// Checks block `i` read as `data` against `allowed`; returns what it holds.
    fn check(&self, i: usize, data: &[u8], allowed: &BTreeSet<u64>, when: &str) -> BTreeSet<u64> {
        let b = self.first + i as u64;
        let gens = generations(data, b);
        let mut seen = BTreeSet::new();
        for (k, g) in gens.iter().enumerate() {
            match g {
                Some(g) if allowed.contains(g) => {
                    seen.insert(*g);
                }
                _ => panic!(
                    "vd{} block {b} sector {k} {when}: holds {g:?}, allowed {allowed:?}",
                    self.dev
                ),
            }
        }
        seen
    }

    /// One write and its read-back; then, now and then, a flush. Err: the
    /// connection is gone.
    fn step(&mut self, c: &mut Nbd) -> std::io::Result<()> {
        let i = self.rand(self.blocks) as usize;
        let b = self.first + i as u64;
        let g = GEN.fetch_add(1, Ordering::Relaxed);
        let fua = self.rand(6) == 0;
        self.state[i].after_kill.insert(g);
        self.counts.writes += 1;
        let data = block_data(g, b);
        match c.request(fua as u16, 1, b * BLOCK, BLOCK as u32, &data) {
            Err(e) => {
                self.state[i].now.insert(g);
                return Err(e);
            }
            Ok(Answer::Err(e)) => {
                self.counts.write_errors += 1;
                self.counts.enospc += u64::from(e == 28);
                self.state[i].now.insert(g);
            }
            Ok(Answer::Ok(_)) => {
                self.state[i].now = [g].into();
                if fua {
                    self.state[i].after_kill = [g].into();
                }
            }
        }
        match c.request(0, 0, b * BLOCK, BLOCK as u32, &[])? {
            Answer::Ok(d) => {
                let now = self.state[i].now.clone();
                self.state[i].now = self.check(i, &d, &now, "read back");
                self.counts.reads_verified += 1;
            }
            Answer::Err(_) => self.counts.read_errors += 1,
        }
        if self.rand(8) == 0 {
            if let Answer::Ok(_) = c.request(0, 3, 0, 0, &[])? {
                self.counts.flushes += 1;
                for st in &mut self.state {
                    st.after_kill = st.now.clone();
                }
            }
        }
        Ok(())
    }

    /// After the connection was lost: every block is one of what a kill
    /// may leave; from then on it holds what was read.
    fn verify_after_kill(&mut self, c: &mut Nbd) -> std::io::Result<()> {
        for i in 0..self.blocks as usize {
            let b = self.first + i as u64;
            if let Answer::Ok(d) = c.request(0, 0, b * BLOCK, BLOCK as u32, &[])? {
                let allowed: BTreeSet<u64> = self.state[i]
                    .after_kill
                    .union(&self.state[i].now)
                    .copied()
                    .collect();
                let seen = self.check(i, &d, &allowed, "after the connection was lost");
                self.state[i].now = seen.clone();
                self.state[i].after_kill = seen;
                self.counts.kill_checks += 1;
            }
        }
        Ok(())
    }

    /// Reads every block once more (the end of the run).
    fn verify_all(&mut self, c: &mut Nbd) -> std::io::Result<()> {
        for i in 0..self.blocks as usize {
            let b = self.first + i as u64;
            if let Answer::Ok(d) = c.request(0, 0, b * BLOCK, BLOCK as u32, &[])? {
                let now = self.state[i].now.clone();
                self.check(i, &d, &now, "at the end");
                self.counts.reads_verified += 1;
            }
        }
        Ok(())
    }
}

/// A connection's life: write and verify until `stop`; when the
/// connection breaks, reconnect (the service may be stopped or
/// restarting) and verify every block against what a kill may leave.
fn client_loop(mut cl: Client, sock: PathBuf, stop: Arc<AtomicBool>) -> Client {
    let export = format!("vd{}", cl.dev);
    let mut conn: Option<Nbd> = None;
    let mut lost = false;
    loop {
        if conn.is_none() {
            let t0 = Instant::now();
            loop {
                match Nbd::connect(&sock, &export) {
                    Ok(c) => {
                        conn = Some(c);
                        break;
                    }
                    Err(e) => {
                        assert!(
                            t0.elapsed() < Duration::from_secs(60),
                            "{export}: no connection for 60 s: {e}"
                        );
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            if lost {
                cl.counts.reconnects += 1;
                if cl.verify_after_kill(conn.as_mut().unwrap()).is_err() {
                    conn = None;
                    continue;
                }
                lost = false;
            }
        }
        let c = conn.as_mut().unwrap();
        if stop.load(Ordering::Relaxed) {
            if cl.verify_all(c).is_err() {
                conn = None;
                lost = true;
                continue;
            }
            return cl;
        }
        if cl.step(c).is_err() {
            conn = None;
            lost = true;
        }
    }
}

// ---- the service ----

/// The service's RSS in KiB and open descriptors.
fn usage(pid: u32) -> (u64, usize) {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = st
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

/// A tmpfs on `dir`, unmounted on drop; `None` (said why) without root.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "cannot mount a tmpfs ({}): the full file system part is skipped",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("cannot mount a tmpfs ({e}): the full file system part is skipped");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Calls `method` on the socket in `sock` (a client of its own, so that
/// the poller runs beside the test's calls); `None` while the service is
/// down.
fn rpc(sock: &Path, method: &str, params: Value) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = json!({"jsonrpc": "2.0", "method": method, "id": 1, "params": params});
    s.write_all(req.to_string().as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Exports every device under its name.
fn export_all(d: &mut Daemon) {
    for i in 0..DEVICES {
        d.call(
            "block-export-add",
            json!({"type": "nbd", "id": format!("vd{i}"), "node-name": format!("vd{i}"),
                   "writable": true}),
        );
    }
}

#[test]
fn faults_under_load_lose_no_acknowledged_write() {
    let soak = soak();
    let (conns, period, scale) = if soak {
        (1000usize, Duration::from_secs(60), 8u32)
    } else {
        (24usize, Duration::from_secs(10), 1u32)
    };
    let at = |s: u64| Duration::from_secs(s) * scale;
    // Job speeds slow down as the timeline stretches, so the faults injected
    // at at(6) still find the jobs running.
    let speed = |mib: u64| mib * MIB / u64::from(scale);
    let work = TempDir::new("soak");
    let img = |n: &str| work.join(n);
    // Ten chains base <- top, the base full of INITIAL.
    for i in 0..DEVICES {
        let (b, t) = (
            img(&format!("base{i}.qcow2")),
            img(&format!("top{i}.qcow2")),
        );
        qemu_img(&["create", "-q", "-f", "qcow2", s(&b), "16M"]);
        qemu_io(&["-c", &format!("write -P {INITIAL} 0 16M"), s(&b)]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&b),
            "-F",
            "qcow2",
            s(&t),
        ]);
    }
    // The mirror's target, on a file system too small for it when root may mount one.
    let fs = Tmpfs::mount(&img("full"), 10);
    let tgt = if fs.is_some() {
        img("full").join("tgt.qcow2")
    } else {
        img("tgt.qcow2")
    };
    qemu_img(&["create", "-q", "-f", "qcow2", s(&tgt), "16M"]);
    let nbd_sock = img("nbd.sock");
    let listen = format!("unix:{}", s(&nbd_sock));
    let cfg = img("sluice.json");

    let mut d = Daemon::start_with(&["-m", "0x3"], &["--nbd-listen", &listen]);
    for i in 0..DEVICES {
        let (b, t) = (
            img(&format!("base{i}.qcow2")),
            img(&format!("top{i}.qcow2")),
        );
        let base_bdev = if i == 0 || i == 8 {
            // Faults go under these bases.
            d.call(
                "bdev_uring_create",
                json!({"name": format!("bf{i}"), "filename": s(&b)}),
            );
            d.call("bdev_error_create", json!({"base_name": format!("bf{i}")}));
            json!({"node_name": format!("base{i}"), "base_bdev": format!("EE_bf{i}")})
        } else {
            json!({"node_name": format!("base{i}"), "filename": s(&b)})
        };
        d.call("bdev_qcow2_open", base_bdev);
        d.call(
            "bdev_qcow2_open",
            json!({"name": format!("vd{i}"), "node_name": format!("top{i}"), "filename": s(&t),
                   "backing": format!("base{i}")}),
        );
    }
    d.call(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt0",
               "file": {"driver": "file", "filename": s(&tgt)}}),
    );
    export_all(&mut d);

    // The connections: each a region of one device.
    let stop = Arc::new(AtomicBool::new(false));
    let per_dev = conns.div_ceil(DEVICES) as u64;
    // The clients write into the first half of each device only under soak
    // (a hundred connections per device would otherwise allocate all of its
    // top image, and the stream over the EIO base would have nothing left
    // to read from it).
    let span = if soak { SIZE / 2 } else { SIZE };
    let region = span / BLOCK / per_dev;
    let blocks = region.min(64);
    let mut threads = Vec::new();
    for k in 0..conns {
        let dev = k % DEVICES;
        let slot = (k / DEVICES) as u64;
        let cl = Client {
            dev,
            first: slot * region,
            blocks,
            state: vec![
                BlockState {
                    now: [0].into(),
                    after_kill: [0].into(),
                };
                blocks as usize
            ],
            counts: Counts::default(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ ((k as u64 + 1) * 0x1234_5678_9abc),
        };
        let (sock, stop) = (nbd_sock.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || client_loop(cl, sock, stop))
                .expect("client thread"),
        );
    }
    // The job poller, on whatever socket the current service has.
    let rpc_sock = Arc::new(Mutex::new(d.rpc_sock.clone()));
    let polls = Arc::new(AtomicU64::new(0));
    let poller = {
        let (sock, stop, polls) = (rpc_sock.clone(), stop.clone(), polls.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let p = sock.lock().unwrap().clone();
                if rpc(&p, "query-block-jobs", json!({})).is_some() {
                    polls.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let t0 = Instant::now();
    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let mut next_sample = t0;
    let sample = |d: &Daemon, samples: &mut Vec<(Duration, u64, usize)>, restart: bool| {
        let (rss, fds) = usage(d.pid());
        let t = t0.elapsed();
        println!(
            "[{:>4} s] service pid {}: RSS {} MiB, {} open fds{}",
            t.as_secs(),
            d.pid(),
            rss / 1024,
            fds,
            if restart { " (after the restart)" } else { "" }
        );
        samples.push((t, rss, fds));
    };
    let wait_until =
        |t: Duration, d: &Daemon, samples: &mut Vec<_>, next: &mut Instant, after: bool| {
            while t0.elapsed() < t {
                if Instant::now() >= *next {
                    sample(d, samples, after);
                    *next += period;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };

    wait_until(at(3), &d, &mut samples, &mut next_sample, false);
    for i in 0..8 {
        d.call(
            "block-stream",
            json!({"job-id": format!("s{i}"), "device": format!("vd{i}"), "speed": speed(2)}),
        );
    }
    d.call(
        "block-commit",
        json!({"job-id": "c8", "device": "vd8", "speed": speed(4)}),
    );
    d.call(
        "blockdev-mirror",
        json!({"job-id": "m9", "device": "vd9", "target": "tgt0", "sync": "full", "speed": speed(4)}),
    );
    wait_until(at(6), &d, &mut samples, &mut next_sample, false);
    d.call(
        "bdev_error_inject_error",
        json!({"name": "EE_bf0", "io_type": "read", "error_type": "eio", "num": 64}),
    );
    d.call(
        "bdev_error_inject_error",
        json!({"name": "EE_bf8", "io_type": "write", "error_type": "enospc", "num": 8}),
    );
    wait_until(at(12), &d, &mut samples, &mut next_sample, false);
    let pid = d.pid().to_string();
    Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("SIGSTOP");
    std::thread::sleep(Duration::from_secs(2));
    Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("SIGCONT");
    wait_until(at(22), &d, &mut samples, &mut next_sample, false);
    let jobs = d.call("query-block-jobs", json!({}));
    println!("jobs before the SIGKILL: {jobs}");
    // How the jobs ended: the injected faults reached them.
    let ends: Vec<(String, String)> = d
        .call("x-query-job-events", json!({}))
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["event"] == "BLOCK_JOB_COMPLETED")
        .map(|e| {
            let data = &e["data"];
            (
                data["device"].as_str().unwrap_or_default().to_string(),
                data["error"].as_str().unwrap_or("ok").to_string(),
            )
        })
        .collect();
    println!("jobs ended: {ends:?}");
    let ended = |id: &str| ends.iter().find(|(j, _)| j == id).map(|(_, e)| e.clone());
    assert!(
        ended("s0").is_some_and(|e| e.contains("Input/output")),
        "the stream over the EIO base: {ends:?}"
    );
    assert!(
        ended("c8").is_some_and(|e| e.contains("No space")),
        "the commit into the ENOSPC base: {ends:?}"
    );
    if fs.is_some() {
        assert!(
            ended("m9").is_some_and(|e| e.contains("No space")),
            "the mirror onto the full file system: {ends:?}"
        );
    }
    for i in 1..8 {
        assert_eq!(ended(&format!("s{i}")).as_deref(), Some("ok"), "{ends:?}");
    }
    d.call("save_config", json!({"filename": s(&cfg)}));
    d.kill();
    std::thread::sleep(Duration::from_millis(500));
    let mut d = Daemon::start_with(
        &["-m", "0x3"],
        &["--nbd-listen", &listen, "--json", s(&cfg)],
    );
    *rpc_sock.lock().unwrap() = d.rpc_sock.clone();
    export_all(&mut d);
    let restarted = samples.len();
    next_sample = Instant::now() + Duration::from_secs(2);
    // Streams again where the first service's did not finish.
    for i in 1..8 {
        let _ = d.call_raw(
            "block-stream",
            json!({"job-id": format!("r{i}"), "device": format!("vd{i}"), "speed": 2 * MIB}),
        );
    }
    let end = if soak {
        at(60).min(Duration::from_secs(540))
    } else {
        at(55)
    };
    wait_until(end, &d, &mut samples, &mut next_sample, true);
    sample(&d, &mut samples, true);
    stop.store(true, Ordering::Relaxed);
    let mut total = Counts::default();
    for t in threads {
        let c = t.join().expect("a client failed").counts;
        total.writes += c.writes;
        total.write_errors += c.write_errors;
        total.enospc += c.enospc;
        total.reads_verified += c.reads_verified;
        total.read_errors += c.read_errors;
        total.flushes += c.flushes;
        total.reconnects += c.reconnects;
        total.kill_checks += c.kill_checks;
    }
    poller.join().expect("poller");
    println!(
        "{conns} connections: {total:?}; {} job polls; {} s",
        polls.load(Ordering::Relaxed),
        t0.elapsed().as_secs()
    );
    assert!(
        total.writes > conns as u64 * 10,
        "too little I/O: {total:?}"
    );
    assert!(
        total.reconnects >= conns as u64,
        "not every connection saw the SIGKILL"
    );
    // Flat after the restart: the last sample against the first.
    let after: Vec<_> = samples[restarted..].to_vec();
    if let (Some(first), Some(last)) = (after.first(), after.last()) {
        assert!(
            last.2 <= first.2 + 2,
            "open fds grew after the restart: {after:?}"
        );
        assert!(
            last.1 <= first.1 + first.1 / 4 + 16 * 1024,
            "RSS grew after the restart: {after:?}"
        );
    }
    // Jobs to the end, then a clean shutdown.
    let t1 = Instant::now();
    while d.call("query-block-jobs", json!({})) != json!([]) {
        if t1.elapsed() > Duration::from_secs(20) {
            for j in d
                .call("query-block-jobs", json!({}))
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let _ = d.call_raw(
                    "block-job-cancel",
                    json!({"device": j["device"], "force": true}),
                );
            }
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "jobs never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.stop(), Some(0), "a clean shutdown");
    for i in 0..DEVICES {
        for n in [format!("base{i}.qcow2"), format!("top{i}.qcow2")] {
            qemu_img(&["check", "-q", s(&img(&n))]);
        }
    }
    // A full target may leak clusters; it must not be corrupt.
    let out = Command::new("qemu-img")
        .args(["check", s(&tgt)])
        .output()
        .expect("qemu-img");
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "the mirror target: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(fs);
}

//! Many devices (issue 19): the listings stay linear in the number of
//! devices, and idle devices cost the reactors nothing per iteration.
//!
//! - `bdev_get_bdevs` and `query-named-block-nodes` over 500 and then 2,000
//!   null devices (a quarter of them `blockdev-add` nodes, so the lookups of
//!   the monitor's table are exercised): the daemon's CPU time per device
//!   (all its threads, from `/proc/PID/task/*/schedstat`, so a loaded machine
//!   stretches the wall clock but not this) may grow by less than 2.5x; a
//!   per-device scan of all devices would make it grow 4x.
//! - A qcow2 image's ring on a reactor is polled only while it has requests
//!   in flight: after the opens, the reactor's running pollers are as many as
//!   before them (SPDK's `thread_get_stats` counts), so a reactor iteration
//!   does not grow with the number of images open.
//! - Those images share the reactor's one io_uring (SPDK's group channel):
//!   the daemon holds one ring and one eventfd however many images are open,
//!   so an image costs one descriptor: its file, on whose open file
//!   description its image lock lives (QEMU's locks are on its `s->fd` too),
//!   and which still keeps QEMU's tools out.
//! - The daemon raises its soft limit on open files to the hard limit at
//!   start, so the devices are bounded by the hard limit.

use serde_json::{json, Value};
use sluice_tests::{qemu_img, Daemon, TempDir};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The CPU time all of `pid`'s threads have run, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One connection, one line per reply (JSON-RPC or QMP).
struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn open(path: &Path) -> Conn {
        let w = UnixStream::connect(path).expect("connect");
        w.set_read_timeout(Some(Duration::from_secs(300))).ok();
        let r = BufReader::new(w.try_clone().expect("clone"));
        Conn { w, r }
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("read reply");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad reply {l:?}: {e}"))
    }

    fn send(&mut self, v: &Value) {
        self.w.write_all(v.to_string().as_bytes()).expect("send");
    }

    /// A JSON-RPC call; its `result`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        let r = self.line();
        assert!(r.get("error").is_none(), "{method}: {r}");
        r["result"].clone()
    }

    /// A QMP command (events before its reply skipped); its `return`.
    fn qmp(&mut self, cmd: &str, args: Value) -> Value {
        self.send(&json!({"execute": cmd, "arguments": args}));
        loop {
            let r = self.line();
            if r.get("event").is_some() {
                continue;
            }
            assert!(r.get("error").is_none(), "{cmd}: {r}");
            return r["return"].clone();
        }
    }
}

/// `n` devices; the daemon's CPU time per device of each listing (best of 3).
fn per_device_cpu(n: usize) -> (f64, f64) {
    let d = Daemon::start(&[]);
    let mut rpc = Conn::open(&d.rpc_sock);
    let mut qmp = Conn::open(&d.qmp_sock);
    qmp.line(); // the greeting
    qmp.qmp("qmp_capabilities", json!({}));
    for i in 0..n {
        if i % 4 == 0 {
            qmp.qmp(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": format!("n{i}"), "size": 1 << 20}),
            );
        } else {
            rpc.call(
                "bdev_null_create",
                json!({"name": format!("d{i}"), "num_blocks": 2048, "block_size": 512}),
            );
        }
    }
    let (mut get, mut nodes) = (u64::MAX, u64::MAX);
    for _ in 0..3 {
        let c0 = cpu_ns(d.pid());
        let b = rpc.call("bdev_get_bdevs", json!({}));
        let c1 = cpu_ns(d.pid());
        let nn = qmp.qmp("query-named-block-nodes", json!({}));
        let c2 = cpu_ns(d.pid());
        assert_eq!(b.as_array().map(Vec::len), Some(n));
        assert!(nn.as_array().is_some_and(|a| a.len() >= n / 4), "{nn}");
        get = get.min(c1 - c0);
        nodes = nodes.min(c2 - c1);
    }
    (get as f64 / n as f64, nodes as f64 / n as f64)
}

#[test]
fn listings_grow_linearly_with_the_number_of_devices() {
    if !Path::new("/proc/self/schedstat").exists() {
        eprintln!("no schedstat: skipped");
        return;
    }
    let (g_small, n_small) = per_device_cpu(500);
    let (g_big, n_big) = per_device_cpu(2000);
    eprintln!(
        "CPU ns per device at 500 / 2000: bdev_get_bdevs {g_small:.0} / {g_big:.0}, \
         query-named-block-nodes {n_small:.0} / {n_big:.0}"
    );
    assert!(
        g_big < 2.5 * g_small,
        "bdev_get_bdevs: {g_small:.0} ns per device at 500, {g_big:.0} at 2000"
    );
    assert!(
        n_big < 2.5 * n_small,
        "query-named-block-nodes: {n_small:.0} ns per device at 500, {n_big:.0} at 2000"
    );
}

fn running_pollers(d: &mut Daemon) -> u64 {
    let s = d.call("thread_get_stats", Value::Null);
    s["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .map(|t| t["active_pollers_count"].as_u64().unwrap_or(0))
        .sum()
}

/// What each descriptor of process `pid` is open on.
fn fd_links(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .map(|e| match std::fs::read_link(e.path()) {
            Ok(l) => format!("{}: {}", e.file_name().to_string_lossy(), l.display()),
            Err(e) => e.to_string(),
        })
        .collect()
}

/// (all but sockets, io_uring, eventfd) descriptors process `pid` holds
/// (the clients' connections come and go with the RPC calls).
fn fds(pid: u32) -> (usize, usize, usize) {
    let (mut all, mut rings, mut efds) = (0, 0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        // One closed since the listing (a connection's) is not counted either.
        let Ok(l) = std::fs::read_link(e.path()) else {
            continue;
        };
        let l = l.to_string_lossy();
        if l.starts_with("socket:") {
            continue;
        }
        all += 1;
        match &*l {
            "anon_inode:[io_uring]" => rings += 1,
            "anon_inode:[eventfd]" => efds += 1,
            _ => {}
        }
    }
    (all, rings, efds)
}

#[test]
fn idle_qcow2_images_are_not_polled() {
    let dir = TempDir::new("scale-q");
    let mut d = Daemon::start(&[]);
    let before = running_pollers(&mut d);
    let fds_before = fds(d.pid());
    let n = 16;
    for i in 0..n {
        let f = dir.join(&format!("i{i}.qcow2"));
        let f = f.to_str().expect("path");
        qemu_img(&["create", "-q", "-f", "qcow2", f, "1M"]);
        d.call(
            "bdev_qcow2_open",
            json!({"name": format!("d{i}"), "filename": f}),
        );
    }
    // The opens read and wrote through each image's ring; nothing is in
    // flight now, so every ring's poller is parked (a poll or two may still
    // be on its way: allow a moment).
    let mut after = running_pollers(&mut d);
    for _ in 0..50 {
        if after <= before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after = running_pollers(&mut d);
    }
    assert!(
        after <= before,
        "{before} pollers running before {n} opens, {after} after"
    );
    // One reactor (-m 0x1): one ring and one eventfd for all the images; each
    // image holds one descriptor, its file, which carries its lock (a lock
    // on a descriptor of its own would make 2 each; a ring and an eventfd
    // per image 4 each).
    let fds_after = fds(d.pid());
    let (all, rings, efds) = (
        fds_after.0 - fds_before.0,
        fds_after.1 - fds_before.1,
        fds_after.2 - fds_before.2,
    );
    let links = fd_links(d.pid());
    for i in 0..n {
        let f = format!("/i{i}.qcow2");
        let held = links.iter().filter(|l| l.ends_with(&f)).count();
        assert_eq!(held, 1, "descriptors on image {i}: {links:?}");
    }
    assert!(
        rings == 1 && efds <= 1 && all <= n + 2,
        "{n} images opened: {all} more descriptors, {rings} more io_urings, {efds} more eventfds \
         ({fds_before:?} -> {fds_after:?}): {links:?}"
    );
    // That one descriptor holds the lock: qemu-img is kept out of an image.
    let f = dir.join("i0.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["info", f.to_str().expect("path")])
        .output()
        .expect("qemu-img");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Failed to get shared \"write\" lock"),
        "qemu-img info of an open image: {:?} {err}",
        out.status
    );
    // A parked ring wakes for the next request: reads complete.
    let v = d.call(
        "bdev_perf_run",
        json!({"workload": "randread", "bdevs": ["d3"], "time_in_sec": 0.2, "queue_depth": 4, "io_size": 4096}),
    );
    let iops = v["results"][0]["iops"].as_f64().unwrap_or(0.0);
    assert!(iops > 0.0, "{v}");
}

/// The soft and hard limits on open files of process `pid`.
fn nofile(pid: u32) -> (u64, u64) {
    let l = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = l
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match v[..] {
        [soft, hard] => (soft, hard),
        // "unlimited" is not a number: the kernel's ceiling applies.
        [soft] => (soft, u64::MAX),
        _ => panic!("{line}"),
    }
}

#[test]
fn the_daemon_raises_its_open_file_limit() {
    let me = std::process::id();
    let (soft, hard) = nofile(me);
    if hard == u64::MAX || hard < 256 {
        eprintln!("hard limit {hard}: skipped");
        return;
    }
    // The daemon inherits a soft limit below the hard one (this process's,
    // lowered for the start and put back).
    let low = (hard / 2).max(128);
    let set = |s: u64| {
        std::process::Command::new("prlimit")
            .args(["--pid", &me.to_string(), &format!("--nofile={s}:{hard}")])
            .status()
            .is_ok_and(|st| st.success())
    };
    if !set(low) {
        eprintln!("no prlimit: skipped");
        return;
    }
    let d = Daemon::start(&[]);
    assert!(set(soft), "putting back the soft limit {soft}");
    let (dsoft, dhard) = nofile(d.pid());
    assert_eq!(
        (dsoft, dhard),
        (hard, hard),
        "started with a soft limit of {low} of {hard}"
    );
}

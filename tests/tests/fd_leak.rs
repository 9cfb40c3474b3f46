//! No descriptor outlives its node: every way of opening and closing nodes,
//! repeated 50 times, leaves the daemon's open file descriptors
//! (`/proc/PID/fd`) where they were after a warm-up cycle, and no descriptor
//! refers to a deleted file (whose space would never be freed).
//!
//! The cycles: `bdev_qcow2_open` + `bdev_qcow2_delete` of a three-image
//! chain; `blockdev-add` / `blockdev-del` of file + qcow2 nodes; a snapshot
//! (`blockdev-snapshot-sync`); a stream; an intermediate and an active
//! commit; a mirror with its pivot; NBD client nodes; NBD exports with a
//! client connected. Each cycle does I/O through the nodes (an export read
//! by `qemu-io`) on two reactors, so every reactor's channels exist.

use serde_json::json;
use sluice_tests::{check, qemu_img, run, Daemon, TempDir};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Cycles per scenario.
const CYCLES: usize = 50;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The daemon's open descriptors: (count, those naming a deleted file).
fn fds(pid: u32) -> (usize, Vec<String>) {
    let dir = format!("/proc/{pid}/fd");
    let mut n = 0;
    let mut deleted = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")) {
        let Ok(e) = e else { continue };
        n += 1;
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy().to_string();
            if t.ends_with(" (deleted)") {
                deleted.push(t);
            }
        }
    }
    (n, deleted)
}

/// A description of every descriptor, for a failure message.
fn fd_table(pid: u32) -> String {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| {
                    let t = std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().to_string())
                        .unwrap_or_default();
                    format!("{} -> {t}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.join("\n")
}

/// Polls `query-block-jobs` until no job is left.
fn wait_no_jobs(d: &mut Daemon) {
    let t0 = Instant::now();
    while d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(t0.elapsed() < Duration::from_secs(60), "a job never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls until job `id` is ready.
fn wait_ready(d: &mut Daemon, id: &str) {
    let t0 = Instant::now();
    loop {
        let jobs = d.call("query-block-jobs", json!({}));
        let j = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == id))
            .unwrap_or_else(|| panic!("job {id} gone before ready: {jobs}"));
        if j["ready"] == true {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{id} never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cycle` once to warm up (first-use caches, listeners), then
/// [`CYCLES`] times, and fails if the daemon's descriptors grew or any
/// names a deleted file.
fn no_growth(what: &str, d: &mut Daemon, mut cycle: impl FnMut(&mut Daemon, usize)) {
    cycle(d, 0);
    let pid = d.pid();
    // Connection threads of the RPC server close their sockets after the
    // reply: give them a moment.
    let settle = |want: Option<usize>| {
        let t0 = Instant::now();
        loop {
            let (n, del) = fds(pid);
            if want.is_none_or(|w| n <= w) || t0.elapsed() > Duration::from_secs(3) {
                return (n, del);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    let (before, del) = settle(None);
    assert!(del.is_empty(), "{what}: deleted files still open: {del:?}");
    for i in 1..=CYCLES {
        cycle(d, i);
    }
    let (after, del) = settle(Some(before));
    println!("{what}: {before} fds after the warm-up, {after} after {CYCLES} more cycles");
    assert!(
        del.is_empty(),
        "{what}: deleted files still open after {CYCLES} cycles: {del:?}"
    );
    assert!(
        after <= before,
        "{what}: {before} fds after the warm-up, {after} after {CYCLES} cycles:\n{}",
        fd_table(pid)
    );
}

/// A daemon on two reactors.
fn daemon() -> Daemon {
    Daemon::start_with(&["-m", "0x3"], &[])
}

/// base <- mid <- top, 4 MiB, data in each.
fn make_chain(dir: &Path) -> [PathBuf; 3] {
    let (base, mid, top) = (
        dir.join("base.qcow2"),
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    for f in [&base, &mid, &top] {
        let _ = std::fs::remove_file(f);
    }
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    for (f, b) in [(&mid, &base), (&top, &mid)] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(b),
            "-F",
            "qcow2",
            s(f),
        ]);
    }
    check(
        run("qemu-io", &["-c", "write -P 0x11 0 1M", s(&base)]),
        "qemu-io base",
    );
    check(
        run("qemu-io", &["-c", "write -P 0x22 1M 1M", s(&mid)]),
        "qemu-io mid",
    );
    [base, mid, top]
}

fn open_chain(d: &mut Daemon, c: &[PathBuf; 3]) {
    d.open_qcow2_chain(
        "vd0",
        &[("base0", s(&c[0])), ("mid0", s(&c[1])), ("top0", s(&c[2]))],
        json!({}),
    );
}

/// Reads and writes through device `dev` with the daemon's own I/O method
/// on each reactor (so both reactors' channels exist).
fn touch(d: &mut Daemon, dev: &str) {
    touch_with(d, dev, "randrw");
}

/// [`touch`] with `workload` (`randread` on a node the monitor claims).
fn touch_with(d: &mut Daemon, dev: &str, workload: &str) {
    let r = d.call_raw(
        "bdev_perf_run",
        json!({"bdevs": [dev], "queue_depth": 4, "io_size": 4096, "workload": workload,
               "time_in_sec": 0.03, "cpumask": "0x3", "length": 2 << 20}),
    );
    if let Some(e) = r.get("error") {
        panic!("bdev_perf_run on {dev}: {e}");
    }
}

#[test]
fn qcow2_open_delete_keeps_fds_flat() {
    let w = TempDir::new("fd-open");
    let c = make_chain(&w.0);
    let mut d = daemon();
    no_growth("bdev_qcow2_open + delete", &mut d, |d, _| {
        open_chain(d, &c);
        touch(d, "vd0");
        d.call("bdev_qcow2_delete", json!({"name": "vd0"}));
    });
}

#[test]
fn blockdev_add_del_keeps_fds_flat() {
    let w = TempDir::new("fd-bd");
    let c = make_chain(&w.0);
    let mut d = daemon();
    no_growth("blockdev-add + blockdev-del", &mut d, |d, _| {
        d.call(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f0", "filename": s(&c[0])}),
        );
        d.call(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q0", "file": "f0"}),
        );
        d.call(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q1", "backing": "q0",
                   "file": {"driver": "file", "filename": s(&c[1])}}),
        );
        touch_with(d, "q1", "randread");
        d.call("blockdev-del", json!({"node-name": "q1"}));
        d.call("blockdev-del", json!({"node-name": "q0"}));
        d.call("blockdev-del", json!({"node-name": "f0"}));
    });
}

#[test]
fn snapshot_and_stream_keep_fds_flat() {
    let w = TempDir::new("fd-snap");
    let mut d = daemon();
    no_growth("snapshot + stream + delete", &mut d, |d, _| {
        let c = make_chain(&w.0);
        let snap = w.join("snap.qcow2");
        let _ = std::fs::remove_file(&snap);
        open_chain(d, &c);
        d.call(
            "blockdev-snapshot-sync",
            json!({"device": "vd0", "snapshot-file": s(&snap), "snapshot-node-name": "snap0",
                   "format": "qcow2"}),
        );
        touch(d, "vd0");
        d.call(
            "block-stream",
            json!({"job-id": "s0", "device": "vd0", "base-node": "base0"}),
        );
        wait_no_jobs(d);
        touch(d, "vd0");
        d.call("bdev_qcow2_delete", json!({"name": "vd0"}));
        // The files the stream dropped are deleted here: a descriptor the
        // daemon kept would show as "(deleted)".
        for f in c.iter().chain([&snap]) {
            std::fs::remove_file(f).expect("remove an image");
        }
    });
}

#[test]
fn commits_keep_fds_flat() {
    let w = TempDir::new("fd-commit");
    let mut d = daemon();
    no_growth("intermediate + active commit", &mut d, |d, _| {
        let c = make_chain(&w.0);
        open_chain(d, &c);
        touch(d, "vd0");
        d.call(
            "block-commit",
            json!({"job-id": "c0", "device": "vd0", "top-node": "mid0", "base-node": "base0"}),
        );
        wait_no_jobs(d);
        d.call("block-commit", json!({"job-id": "c1", "device": "vd0"}));
        wait_ready(d, "c1");
        d.call("block-job-complete", json!({"device": "c1"}));
        wait_no_jobs(d);
        touch(d, "vd0");
        d.call("bdev_qcow2_delete", json!({"name": "vd0"}));
        for f in &c {
            std::fs::remove_file(f).expect("remove an image");
        }
    });
}

#[test]
fn mirror_keeps_fds_flat() {
    let w = TempDir::new("fd-mirror");
    let mut d = daemon();
    no_growth("mirror + pivot", &mut d, |d, _| {
        let c = make_chain(&w.0);
        let tgt = w.join("tgt.qcow2");
        let _ = std::fs::remove_file(&tgt);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&tgt), "4M"]);
        open_chain(d, &c);
        d.call(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "tgt0",
                   "file": {"driver": "file", "filename": s(&tgt)}}),
        );
        d.call(
            "blockdev-mirror",
            json!({"job-id": "m0", "device": "vd0", "target": "tgt0", "sync": "full"}),
        );
        wait_ready(d, "m0");
        touch(d, "vd0");
        d.call("block-job-complete", json!({"device": "m0"}));
        wait_no_jobs(d);
        touch(d, "vd0");
        d.call("bdev_qcow2_delete", json!({"name": "vd0"}));
        // After the pivot the device is on tgt0; the old chain stays, as
        // in QEMU, until it is deleted.
        d.call("bdev_qcow2_delete", json!({"name": "top0"}));
        d.call("blockdev-del", json!({"node-name": "tgt0"}));
        assert_eq!(d.call("bdev_get_bdevs", json!({})), json!([]));
        for f in c.iter().chain([&tgt]) {
            std::fs::remove_file(f).expect("remove an image");
        }
    });
}

#[test]
fn nbd_clients_and_exports_keep_fds_flat() {
    let w = TempDir::new("fd-nbd");
    let c = make_chain(&w.0);
    let sock = w.join("nbd.sock");
    let mut d = daemon();
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s(&sock)}}}),
    );
    open_chain(&mut d, &c);
    no_growth("NBD exports + client nodes", &mut d, |d, i| {
        d.call(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "vd0", "name": "vd0", "writable": true}),
        );
        let uri = format!("nbd+unix:///vd0?socket={}", s(&sock));
        // The chain's pattern is there until the first cycle's random writes
        // through c1 (below) land over it.
        let read = if i == 0 {
            "read -P 0x11 0 64k"
        } else {
            "read 0 64k"
        };
        check(
            run("qemu-io", &["-f", "raw", "-c", read, &uri]),
            "qemu-io over the export",
        );
        d.call(
            "bdev_nbd_client_create",
            json!({"name": "c1", "socket": s(&sock), "export": "vd0"}),
        );
        touch(d, "c1");
        d.call("bdev_nbd_client_delete", json!({"name": "c1"}));
        d.call(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "c2", "export": "vd0",
                   "server": {"type": "unix", "path": s(&sock)}}),
        );
        touch_with(d, "c2", "randread");
        d.call("blockdev-del", json!({"node-name": "c2"}));
        d.call("block-export-del", json!({"id": "e0"}));
        // The export goes once its last client has.
        let t0 = Instant::now();
        while d.call("query-block-exports", json!({})) != json!([]) {
            assert!(t0.elapsed() < Duration::from_secs(10), "the export stayed");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

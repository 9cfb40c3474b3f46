//! The block graph's promises, end to end through the real daemon:
//!
//! - every node that comes or goes is announced: replaying SPDK's
//!   `notify_get_notifications` (`bdev_register` / `bdev_unregister`) gives
//!   exactly the nodes `bdev_get_bdevs` lists, after every way of creating
//!   and deleting one (the `bdev_*_delete` methods, `blockdev-del`, a
//!   snapshot's overlay, the images a stream releases, `blockdev-create` over
//!   a file node);
//! - a failing or lost `bdev_qcow2_open` leaves nothing behind: no node, no
//!   claim, no image lock (qemu-io opens the file for writing afterwards).

use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, Daemon, TempDir};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The names `bdev_get_bdevs` lists.
fn listed(d: &mut Daemon) -> BTreeSet<String> {
    d.call("bdev_get_bdevs", json!({}))
        .as_array()
        .expect("bdev_get_bdevs: an array")
        .iter()
        .map(|b| b["name"].as_str().expect("a name").to_string())
        .collect()
}

/// The nodes the notifications announce, replayed in order. A node
/// announced twice, or gone without having come, is a failure.
fn announced(d: &mut Daemon) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let notes = d.call("notify_get_notifications", json!({}));
    for n in notes.as_array().expect("notifications: an array") {
        let name = n["ctx"].as_str().unwrap_or_default().to_string();
        match n["type"].as_str() {
            Some("bdev_register") => {
                assert!(set.insert(name.clone()), "{name} registered twice: {notes}");
            }
            Some("bdev_unregister") => {
                assert!(
                    set.remove(&name),
                    "{name} unregistered but never registered: {notes}"
                );
            }
            _ => {}
        }
    }
    set
}

fn assert_announced(d: &mut Daemon, after: &str) {
    let (l, a) = (listed(d), announced(d));
    assert_eq!(
        a, l,
        "after {after}: the notifications announce {a:?}, the daemon lists {l:?}"
    );
}

fn wait_no_jobs(d: &mut Daemon) {
    let t0 = Instant::now();
    while d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn every_delete_method_publishes_bdev_unregister() {
    let work = TempDir::new("graph-leaves");
    let raw = work.join("raw.img");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 64, "block_size": 512}),
    );
    d.call(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 64, "block_size": 512}),
    );
    d.call(
        "bdev_uring_create",
        json!({"name": "U0", "filename": s(&raw)}),
    );
    d.call("bdev_error_create", json!({"base_name": "N0"}));
    assert_announced(&mut d, "creating the leaves");
    for (m, n) in [
        ("bdev_error_delete", "EE_N0"),
        ("bdev_null_delete", "N0"),
        ("bdev_malloc_delete", "M0"),
        ("bdev_uring_delete", "U0"),
    ] {
        d.call(m, json!({ "name": n }));
        assert_announced(&mut d, m);
    }
    assert!(listed(&mut d).is_empty());
}

#[test]
fn snapshots_streams_and_image_deletes_announce_their_nodes() {
    let work = TempDir::new("graph-chain");
    let (base, mid, top, snap) = (
        work.join("base.qcow2"),
        work.join("mid.qcow2"),
        work.join("top.qcow2"),
        work.join("snap.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&["-c", "write -P 0x11 0 1M", s(&base)]);
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
    let mut d = Daemon::start(&[]);
    d.open_qcow2_chain(
        "vd0",
        &[("base0", s(&base)), ("mid0", s(&mid)), ("top0", s(&top))],
        json!({}),
    );
    assert_announced(&mut d, "bdev_qcow2_open");
    d.call(
        "blockdev-snapshot-sync",
        json!({"device": "vd0", "snapshot-file": s(&snap), "snapshot-node-name": "snap0", "format": "qcow2"}),
    );
    assert!(listed(&mut d).contains("snap0"));
    assert_announced(&mut d, "blockdev-snapshot-sync");
    d.call(
        "block-stream",
        json!({"job-id": "s0", "device": "vd0", "base-node": "base0"}),
    );
    wait_no_jobs(&mut d);
    assert!(!listed(&mut d).contains("mid0"), "the stream released mid0");
    assert_announced(&mut d, "a stream that released images");
    d.call("bdev_qcow2_delete", json!({"name": "vd0"}));
    assert_announced(&mut d, "bdev_qcow2_delete");
    assert!(listed(&mut d).is_empty(), "{:?}", listed(&mut d));
}

#[test]
fn blockdev_add_create_and_del_announce_their_nodes() {
    let work = TempDir::new("graph-blockdev");
    let img = work.join("img.qcow2");
    std::fs::write(&img, b"").expect("create the file");
    let mut d = Daemon::start(&[]);
    d.call(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f0", "filename": s(&img)}),
    );
    d.call(
        "blockdev-create",
        json!({"job-id": "c0", "options": {"driver": "qcow2", "file": "f0", "size": 4194304}}),
    );
    let t0 = Instant::now();
    loop {
        let jobs = d.call("query-jobs", json!({}));
        if jobs[0]["status"] == "concluded" {
            assert!(jobs[0].get("error").is_none(), "{jobs}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{jobs}");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.call("job-dismiss", json!({"id": "c0"}));
    assert_announced(&mut d, "blockdev-create over a file node");
    d.call(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q0", "file": "f0"}),
    );
    assert_announced(&mut d, "blockdev-add of an image over a file node");
    d.call("blockdev-del", json!({"node-name": "q0"}));
    assert_announced(&mut d, "blockdev-del of the image");
    d.call("blockdev-del", json!({"node-name": "f0"}));
    assert_announced(&mut d, "blockdev-del of the file node");
    assert!(listed(&mut d).is_empty(), "{:?}", listed(&mut d));
}

/// Whether another process can take the image for writing.
fn writable_elsewhere(f: &Path) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 4k", s(f)])
        .output()
        .expect("run qemu-io");
    out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("lock")
}

#[test]
fn a_failed_open_leaves_no_node_claim_or_lock() {
    let work = TempDir::new("graph-failed-open");
    let f = work.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&f), "1M"]);
    let len = std::fs::metadata(&f).expect("stat").len();
    let mut d = Daemon::start(&[]);
    // The image opens, then its device cannot be made (an empty name).
    let e = d.call_err(
        "bdev_qcow2_open",
        json!({"name": "", "node_name": "n0", "filename": s(&f)}),
    );
    assert!(
        e["message"].as_str().unwrap_or_default().contains("empty"),
        "{e}"
    );
    assert!(
        listed(&mut d).is_empty(),
        "left behind: {:?}",
        listed(&mut d)
    );
    assert_announced(&mut d, "a failed open");
    // A writable open extends the file by the virtual size (1 MiB); the
    // rollback trims it back to the image's end, as a delete does.
    let after = std::fs::metadata(&f).expect("stat").len();
    assert!(
        after < len + (1 << 20),
        "the failed open left the file extended: {len} -> {after} bytes"
    );
    qemu_img(&["check", "-q", s(&f)]);
    assert!(
        writable_elsewhere(&f),
        "the failed open kept the image lock"
    );
    // The name is free again.
    d.call(
        "bdev_qcow2_open",
        json!({"node_name": "n0", "filename": s(&f)}),
    );
    d.call("bdev_qcow2_delete", json!({"name": "n0"}));
}

/// Sends one JSON-RPC request on its own connection; returns the reply.
fn call_on(sock: &Path, method: &str, params: Value) -> Value {
    let mut c = UnixStream::connect(sock).expect("connect");
    let req = json!({"jsonrpc": "2.0", "method": method, "id": 1, "params": params});
    c.write_all(req.to_string().as_bytes()).expect("send");
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("a JSON reply")
}

#[test]
fn a_lost_open_race_leaves_nothing_behind() {
    let work = TempDir::new("graph-open-race");
    let mut d = Daemon::start(&[]);
    for round in 0..12 {
        let files: Vec<_> = (0..2)
            .map(|i| {
                let f = work.join(&format!("r{round}-{i}.qcow2"));
                qemu_img(&["create", "-q", "-f", "qcow2", s(&f), "1M"]);
                f
            })
            .collect();
        // Two clients open two images as the same device at the same time.
        let replies: Vec<Value> = std::thread::scope(|sc| {
            let hs: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let sock = d.rpc_sock.clone();
                    sc.spawn(move || {
                        call_on(
                            &sock,
                            "bdev_qcow2_open",
                            json!({"name": format!("dev{round}"), "node_name": format!("n{round}-{i}"), "filename": s(f)}),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("client")).collect()
        });
        let won: Vec<usize> = (0..2)
            .filter(|&i| replies[i].get("result").is_some())
            .collect();
        assert_eq!(won.len(), 1, "exactly one open wins: {replies:?}");
        let lost = 1 - won[0];
        let names = listed(&mut d);
        assert!(
            !names.contains(&format!("n{round}-{lost}")),
            "round {round}: the losing open left its node: {names:?} ({replies:?})"
        );
        assert!(
            writable_elsewhere(&files[lost]),
            "round {round}: the losing open kept its image lock"
        );
        assert_announced(&mut d, "an open race");
        d.call("bdev_qcow2_delete", json!({"name": format!("dev{round}")}));
    }
}

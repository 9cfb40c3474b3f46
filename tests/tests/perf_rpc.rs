//! `sluice perf -s SOCK` and its method `bdev_perf_run`: the engine runs in a
//! daemon on its bdevs and reactors, prints and exits as a local run does, and
//! refuses what would hurt the daemon's images; local runs leave the qcow2
//! images they wrote flushed, closed and clean; `bdev_null_create` takes the
//! `zero_reads` that `save_config` emits.

use serde_json::{json, Value};
use sluice_tests::{qemu_img, sluice_bin, Daemon, TempDir};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn perf(args: &[&str]) -> Output {
    Command::new(sluice_bin())
        .arg("perf")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sluice perf")
}

fn remote(d: &Daemon, args: &[&str]) -> Output {
    let mut a = vec!["-s", d.rpc_sock.to_str().unwrap()];
    a.extend_from_slice(args);
    perf(&a)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn expect_code(o: &Output, code: i32) -> (String, String) {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(code), "stdout: {out}\nstderr: {err}");
    (out, err)
}

#[test]
fn perf_in_a_daemon_prints_and_exits_like_a_local_run() {
    let mut d = Daemon::start_with(&["-m", "0x3"], &[]);
    d.call(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 65536, "block_size": 512}),
    );
    d.call(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 65536, "block_size": 512}),
    );
    // The table, one job per reactor of the mask.
    let o = remote(
        &d,
        &[
            "-w", "verify", "-T", "M0", "-m", "0x3", "-q", "8", "-t", "0.5",
        ],
    );
    let (out, _) = expect_code(&o, 0);
    assert!(out.contains("Running I/O for 0.5 seconds..."), "{out}");
    assert!(
        out.contains("Job: M0 (Core Mask 0x1, workload: verify, depth: 8, IO size: 4096)"),
        "{out}"
    );
    assert!(out.contains("Job: M0 (Core Mask 0x2"), "{out}");
    assert!(out.contains(" Total "), "{out}");
    // Default: the daemon's first reactor only; JSON as `--json` prints it locally.
    let o = remote(
        &d,
        &[
            "-w", "randread", "-T", "M0", "-t", "0.3", "-o", "8k", "--json",
        ],
    );
    let (out, _) = expect_code(&o, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 1, "{v}");
    assert_eq!(r[0]["core_mask"], "0x1");
    assert_eq!(r[0]["io_size"], 8192);
    assert!(r[0]["iops"].as_f64().unwrap() > 0.0);
    // A null bdev stores nothing: verify fails with exit code 1 and says where.
    let o = remote(&d, &["-w", "verify", "-T", "N0", "-q", "4", "-t", "0.3"]);
    let (_, err) = expect_code(&o, 1);
    assert!(
        err.contains("verify failed on N0") && err.contains("mismatch at offset"),
        "{err}"
    );
    let o = remote(
        &d,
        &["-w", "verify", "-T", "N0", "-q", "4", "-t", "0.3", "--json"],
    );
    let (out, _) = expect_code(&o, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["results"][0]["status"], "failed");
    assert!(v["results"][0]["verify_mismatch"]["offset"].is_u64());
    // The range: a job on [1M, 2M) of M0 writes only there.
    let o = remote(
        &d,
        &[
            "-w", "write", "-T", "M0", "-t", "0.2", "--offset", "1m", "--length", "1m",
        ],
    );
    expect_code(&o, 0);
    // The method itself, called directly.
    let v = d.call(
        "bdev_perf_run",
        json!({"workload": "randrw", "rwmixread": 70, "bdevs": ["M0"], "time_in_sec": 0.2, "queue_depth": 4}),
    );
    assert_eq!(v["results"][0]["workload"], "randrw");
    assert_eq!(v["results"][0]["queue_depth"], 4);
    let e = d.call_err("bdev_perf_run", json!({"workload": "read", "bogus": 1}));
    assert_eq!(e["code"], -32602, "{e}");
    let e = d.call_err(
        "bdev_perf_run",
        json!({"workload": "read", "bdevs": ["Nope"], "time_in_sec": 0.1}),
    );
    assert_eq!(e["code"], -19, "{e}");
    d.stop();
}

#[test]
fn perf_in_a_daemon_refuses_what_would_hurt_it() {
    let dir = TempDir::new("prr");
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"]);
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "node_name": "vd0-node", "filename": p}),
    );
    let bad = |args: &[&str], want: &str| {
        let o = remote(&d, args);
        let (_, err) = expect_code(&o, 2);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    };
    // Writing under the device, into its node, would corrupt the image.
    bad(
        &["-w", "write", "-T", "vd0-node", "-t", "0.1"],
        "claimed by device vd0",
    );
    bad(&["-w", "verify", "-T", "Nope", "-t", "0.1"], "Nope");
    bad(
        &["-w", "read", "-T", "vd0", "-m", "0x4", "-t", "0.1"],
        "core 2 runs no reactor",
    );
    bad(
        &["-w", "read", "-T", "vd0", "-o", "1000", "-t", "0.1"],
        "block size",
    );
    bad(
        &[
            "-w", "read", "-T", "vd0", "--offset", "1m", "--length", "16m", "-t", "0.1",
        ],
        "range",
    );
    bad(
        &["-w", "read", "--null", "X:1", "-t", "0.1"],
        "create them there",
    );
    // Reading the node is harmless; writing through the device is what it is for.
    expect_code(
        &remote(&d, &["-w", "read", "-T", "vd0-node", "-t", "0.1"]),
        0,
    );
    expect_code(
        &remote(&d, &["-w", "verify", "-T", "vd0", "-q", "4", "-t", "0.2"]),
        0,
    );
    // No daemon there.
    let o = perf(&[
        "-s",
        dir.join("none.sock").to_str().unwrap(),
        "-w",
        "read",
        "-t",
        "0.1",
    ]);
    let (_, err) = expect_code(&o, 2);
    assert!(err.contains("cannot connect"), "{err}");
    d.call("bdev_qcow2_delete", json!({"name": "vd0"}));
    qemu_img(&["check", p]);
    d.stop();
}

#[test]
fn the_daemon_answers_while_a_perf_run_is_in_progress() {
    let mut d = Daemon::start_with(&["-m", "0x3"], &[]);
    d.call(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 32768, "block_size": 512}),
    );
    let sock = d.rpc_sock.clone();
    let t = std::thread::spawn(move || {
        Command::new(sluice_bin())
            .args(["perf", "-s"])
            .arg(&sock)
            .args([
                "-w", "randread", "-T", "M0", "-m", "0x3", "-t", "2", "--json",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    // The run holds one RPC thread; the reactors and other clients go on.
    let t0 = Instant::now();
    let reactors = d.call("framework_get_reactors", Value::Null);
    let stats = d.call("bdev_get_iostat", json!({"name": "M0"}));
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "RPCs waited for the run: {:?}",
        t0.elapsed()
    );
    assert!(!t.is_finished(), "the run must still be going");
    assert_eq!(
        reactors["reactors"].as_array().map(Vec::len),
        Some(2),
        "{reactors}"
    );
    assert!(
        stats["bdevs"][0]["num_read_ops"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let (out, _) = expect_code(&t.join().unwrap(), 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"].as_array().map(Vec::len), Some(2));
    d.stop();
}

fn check_json(path: &str) -> Value {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", path])
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img check {path}: {so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&so).unwrap()
}

/// Writes a JSON config file whose bdev subsystem holds the one `entry`.
fn write_bdev_config(path: &std::path::Path, entry: Value) {
    std::fs::write(
        path,
        json!({"subsystems": [{"subsystem": "bdev", "config": [entry]}]}).to_string(),
    )
    .unwrap();
}

#[test]
fn local_perf_leaves_the_qcow2_images_it_wrote_durable_and_clean() {
    let dir = TempDir::new("pq2");
    let img = dir.join("q.qcow2");
    let p = img.to_str().unwrap().to_string();
    let cfg = dir.join("create.json");
    write_bdev_config(
        &cfg,
        json!({"method": "bdev_qcow2_create", "params": {"name": "Q0", "filename": p, "size": 32 << 20}}),
    );
    let o = perf(&[
        "--no-pin",
        "-c",
        cfg.to_str().unwrap(),
        "-w",
        "randwrite",
        "-q",
        "8",
        "-t",
        "0.5",
    ]);
    let (out, _) = expect_code(&o, 0);
    assert!(out.contains("Job: Q0"), "{out}");
    let c = check_json(&p);
    assert_eq!(c["check-errors"], 0, "{c}");
    assert!(
        c.get("corruptions").is_none() && c.get("leaks").is_none(),
        "{c}"
    );
    assert!(c["allocated-clusters"].as_u64().unwrap() > 0, "{c}");
    // Open the image again and verify a range: the pattern is in the file.
    let cfg = dir.join("open.json");
    write_bdev_config(
        &cfg,
        json!({"method": "bdev_qcow2_open", "params": {"name": "Q1", "filename": p}}),
    );
    let o = perf(&[
        "--no-pin",
        "-c",
        cfg.to_str().unwrap(),
        "-w",
        "verify",
        "-q",
        "4",
        "-t",
        "0.3",
        "--offset",
        "1m",
        "--length",
        "1m",
    ]);
    expect_code(&o, 0);
    let c = check_json(&p);
    assert_eq!(c["check-errors"], 0, "{c}");
    assert!(
        c.get("corruptions").is_none() && c.get("leaks").is_none(),
        "{c}"
    );
    let raw = dir.join("q.raw");
    qemu_img(&["convert", "-O", "raw", &p, raw.to_str().unwrap()]);
    let data = std::fs::read(&raw).unwrap();
    let off = 1 << 20;
    assert_eq!(
        u64::from_le_bytes(data[off..off + 8].try_into().unwrap()),
        off as u64,
        "the verify pattern of the first request is in the image"
    );
}

#[test]
fn null_bdev_zero_reads_round_trips_through_save_config() {
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_null_create",
        json!({"name": "NZ", "num_blocks": 2048, "block_size": 512, "zero_reads": false}),
    );
    d.call(
        "bdev_null_create",
        json!({"name": "NY", "num_blocks": 2048, "block_size": 512, "zero_reads": true}),
    );
    let b = d.call("bdev_get_bdevs", json!({"name": "NZ"}));
    assert_eq!(b[0]["driver_specific"]["null"]["zero_reads"], false, "{b}");
    let cfg = d.call("save_config", Value::Null);
    let entries: Vec<Value> = cfg["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["subsystem"] == "bdev")
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .collect();
    let nz = entries
        .iter()
        .find(|e| e["params"]["name"] == "NZ")
        .unwrap_or_else(|| panic!("{cfg}"));
    assert_eq!(nz["params"]["zero_reads"], false, "{nz}");
    d.stop();
    // The saved config replays (the entry that carries zero_reads included).
    let dir = TempDir::new("pnz");
    let path = dir.join("saved.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut d = Daemon::start(&["--json", path.to_str().unwrap()]);
    let b = d.call("bdev_get_bdevs", json!({"name": "NZ"}));
    assert_eq!(b[0]["driver_specific"]["null"]["zero_reads"], false, "{b}");
    let b = d.call("bdev_get_bdevs", json!({"name": "NY"}));
    assert_eq!(b[0]["driver_specific"]["null"]["zero_reads"], true, "{b}");
    d.stop();
}

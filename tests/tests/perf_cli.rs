//! `sluice perf` end to end: every leaf bdev through `-w verify`, the other
//! workloads, the JSON output, bdevs from an SPDK JSON config (including an
//! error bdev whose failures and corruption the run reports), bad configs and
//! bad options with clear errors, and the DMA fallback warning.

use serde_json::{json, Value};
use sluice_tests::{sluice_bin, TempDir};
use std::process::{Command, Output};

fn perf(args: &[&str]) -> Output {
    Command::new(sluice_bin())
        .arg("perf")
        .arg("--no-pin")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sluice perf")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs with `--json` and expects exit code `code`; returns the document.
fn perf_json(args: &[&str], code: i32) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = perf(&a);
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "args {args:?}\nstdout: {out}\nstderr: {err}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn config(dir: &TempDir, entries: Value) -> String {
    let p = dir.join("bdevs.json");
    let doc = json!({"subsystems": [{"subsystem": "bdev", "config": entries}]});
    std::fs::write(&p, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    p.display().to_string()
}

#[test]
fn null_randread_prints_bdevperf_table_and_json() {
    let o = perf(&[
        "--null", "Null0:64", "-q", "16", "-o", "4k", "-w", "randread", "-t", "0.5",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("Running I/O for 0.5 seconds..."), "{out}");
    assert!(out.contains("Job: Null0 (Core Mask 0x1"), "{out}");
    for col in [
        "IOPS", "MiB/s", "Fail/s", "Average", "min", "max", "p50", "p99", "p99.9",
    ] {
        assert!(out.contains(col), "column {col}: {out}");
    }
    assert!(out.contains(" Total "), "{out}");
    let v = perf_json(
        &[
            "--null",
            "Null1:64:4096",
            "-q",
            "8",
            "-o",
            "8k",
            "-w",
            "randread",
            "-t",
            "0.3",
        ],
        0,
    );
    let r = &v["results"][0];
    assert_eq!(r["job"], "Null1");
    assert_eq!(r["workload"], "randread");
    assert_eq!(r["queue_depth"], 8);
    assert_eq!(r["io_size"], 8192);
    assert_eq!(r["status"], "finished");
    let iops = r["iops"].as_f64().unwrap();
    assert!(iops > 1000.0, "{r}");
    let mibps = r["mibps"].as_f64().unwrap();
    assert!(
        (mibps - iops * 8192.0 / 1048576.0).abs() / mibps < 0.01,
        "MiB/s matches IOPS x size"
    );
    let (p50, p99, p999) = (
        r["p50_latency_us"].as_f64().unwrap(),
        r["p99_latency_us"].as_f64().unwrap(),
        r["p999_latency_us"].as_f64().unwrap(),
    );
    let (min, max) = (
        r["min_latency_us"].as_f64().unwrap(),
        r["max_latency_us"].as_f64().unwrap(),
    );
    assert!(
        min <= p50 * 1.05 && p50 <= p99 && p99 <= p999 && p999 <= max * 1.05,
        "{r}"
    );
    assert!(v["ok"].as_bool().unwrap());
}

#[test]
fn verify_passes_on_malloc_and_uring_and_fails_on_null() {
    let dir = TempDir::new("pv");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let file = format!("U0={}", img.display());
    let v = perf_json(
        &[
            "--malloc", "M0:32", "-q", "16", "-o", "4k", "-w", "verify", "-t", "0.5",
        ],
        0,
    );
    assert!(v["results"][0]["iops"].as_f64().unwrap() > 0.0, "{v}");
    let v = perf_json(
        &[
            "--file", &file, "-q", "8", "-o", "4k", "-w", "verify", "-t", "0.5",
        ],
        0,
    );
    assert!(v["results"][0]["iops"].as_f64().unwrap() > 0.0, "{v}");
    let v = perf_json(
        &[
            "--file",
            &file,
            "--buffered",
            "-q",
            "4",
            "-o",
            "64k",
            "-w",
            "verify",
            "-t",
            "0.3",
        ],
        0,
    );
    assert_eq!(v["results"][0]["job"], "U0");
    // The pattern reached the file: sector headers carry their own offset.
    let data = std::fs::read(&img).unwrap();
    let off = 65536usize;
    assert_eq!(
        u64::from_le_bytes(data[off..off + 8].try_into().unwrap()),
        off as u64
    );
    // A null bdev stores nothing: verify must catch it and say where.
    let o = perf(&["--null", "N0:16", "-q", "4", "-w", "verify", "-t", "0.3"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        err.contains("verify failed on N0")
            && err.contains("mismatch at offset")
            && err.contains("expected ["),
        "{err}"
    );
    let v = perf_json(
        &["--null", "N1:16", "-q", "4", "-w", "verify", "-t", "0.3"],
        1,
    );
    assert_eq!(v["results"][0]["status"], "failed");
    assert!(v["results"][0]["verify_mismatch"]["offset"].is_u64());
}

#[test]
fn other_workloads_run() {
    for (w, extra) in [
        ("read", vec![]),
        ("write", vec![]),
        ("randwrite", vec![]),
        ("rw", vec!["-M", "70"]),
        ("randrw", vec![]),
        ("flush", vec![]),
        ("unmap", vec![]),
        ("write_zeroes", vec![]),
    ] {
        let mut args = vec![
            "--malloc", "M0:16", "-q", "8", "-o", "4k", "-w", w, "-t", "0.2",
        ];
        args.extend(extra);
        let v = perf_json(&args, 0);
        let r = &v["results"][0];
        assert_eq!(r["workload"], w);
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{w}: {r}");
        assert_eq!(r["io_failed"], 0, "{w}");
    }
}

#[test]
fn config_file_in_spdk_format_with_error_injection() {
    let dir = TempDir::new("pc");
    let cfg = config(
        &dir,
        json!([
            {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8192, "block_size": 512}},
            {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 8192, "block_size": 512}},
            {"method": "bdev_error_create", "params": {"base_name": "Malloc0"}},
            {"method": "bdev_error_inject_error", "params": {"name": "EE_Malloc0", "io_type": "read", "error_type": "failure", "num": 0}}
        ]),
    );
    // Every unclaimed bdev is a target: EE_Malloc0 and Null0, not the claimed Malloc0.
    let v = perf_json(
        &["-c", &cfg, "-q", "4", "-w", "randread", "-t", "0.3", "-f"],
        0,
    );
    let jobs: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["job"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, vec!["EE_Malloc0", "Null0"]);
    assert!(
        v["results"][0]["io_failed"].as_u64().unwrap() > 0,
        "injected failures are counted"
    );
    assert_eq!(v["results"][0]["iops"].as_f64().unwrap(), 0.0);
    assert_eq!(v["results"][1]["io_failed"], 0);
    // Without -f the first failure fails the run, and the error is named.
    let o = perf(&[
        "-c",
        &cfg,
        "-T",
        "EE_Malloc0",
        "-q",
        "4",
        "-w",
        "randread",
        "-t",
        "0.3",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("I/O error") && err.contains("EIO"), "{err}");
    // Corrupted reads are caught by verify.
    let cfg2 = config(
        &dir,
        json!([
            {"method": "bdev_malloc_create", "params": {"name": "Malloc1", "num_blocks": 8192, "block_size": 512}},
            {"method": "bdev_error_create", "params": {"base_name": "Malloc1"}},
            {"method": "bdev_error_inject_error", "params": {"name": "EE_Malloc1", "io_type": "read", "error_type": "corrupt_data", "num": 1, "corrupt_offset": 100, "corrupt_value": 1}}
        ]),
    );
    let o = perf(&["-c", &cfg2, "-q", "4", "-w", "verify", "-t", "0.3"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("mismatch at offset"), "{err}");
}

#[test]
fn bad_configs_and_options_give_clear_errors() {
    let dir = TempDir::new("pb");
    let check = |args: &[&str], want: &str| {
        let o = perf(args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out}\n{err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    };
    let unknown = config(
        &dir,
        json!([{"method": "bdev_bogus_create", "params": {"name": "X"}}]),
    );
    check(
        &["-c", &unknown, "-w", "read", "-t", "0.1"],
        "bdev_bogus_create",
    );
    let missing = config(
        &dir,
        json!([{"method": "bdev_malloc_create", "params": {"name": "X", "block_size": 512}}]),
    );
    check(&["-c", &missing, "-w", "read", "-t", "0.1"], "num_blocks");
    let nofile = config(
        &dir,
        json!([{"method": "bdev_uring_create", "params": {"name": "U", "filename": "/nonexistent/x.img"}}]),
    );
    check(
        &["-c", &nofile, "-w", "read", "-t", "0.1"],
        "/nonexistent/x.img",
    );
    check(
        &["-c", "/nonexistent/config.json", "-w", "read", "-t", "0.1"],
        "/nonexistent/config.json",
    );
    check(
        &["--file", "/nonexistent/disk.img", "-w", "read", "-t", "0.1"],
        "/nonexistent/disk.img",
    );
    check(
        &["--null", "N0:16", "-o", "1000", "-w", "read", "-t", "0.1"],
        "block size",
    );
    check(
        &["--null", "N0:16", "-w", "read", "-M", "50", "-t", "0.1"],
        "-M",
    );
    check(&["--null", "N0:16", "-w", "read", "-q", "0"], "queue depth");
    check(&["--null", "N0", "-w", "read"], "NAME:SIZE_MIB");
    check(&["-w", "read"], "no bdevs");
    check(
        &["--null", "N0:16", "-w", "read", "-T", "Nope", "-t", "0.1"],
        "Nope",
    );
    check(
        &[
            "--null",
            "N0:16",
            "-w",
            "read",
            "-m",
            "0x10000000",
            "-t",
            "0.1",
        ],
        "core",
    );
    let o = perf(&["--null", "N0:16", "-w", "sideways"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("unknown workload"), "{}", text(&o).1);
}

#[test]
fn two_reactors_run_one_job_each_on_disjoint_shares() {
    if std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        < 2
    {
        return;
    }
    let v = perf_json(
        &[
            "--malloc", "M0:32", "-m", "0x3", "-q", "8", "-w", "verify", "-t", "0.3",
        ],
        0,
    );
    let rs = v["results"].as_array().unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0]["core_mask"], "0x1");
    assert_eq!(rs[1]["core_mask"], "0x2");
    let total = v["total"]["iops"].as_f64().unwrap();
    let sum: f64 = rs.iter().map(|r| r["iops"].as_f64().unwrap()).sum();
    assert!((total - sum).abs() < 1.0);
}

#[test]
fn dma_fallback_warns_once_and_runs() {
    let o = Command::new(sluice_bin())
        .args([
            "perf", "--no-pin", "--malloc", "M0:16", "-w", "verify", "-q", "4", "-t", "0.2",
        ])
        .env("RUST_LOG", "warn")
        .env("SLUICE_NO_HUGE", "1")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("DMA memory uses ordinary pages").count(),
        1,
        "{err}"
    );
}

#[test]
fn queue_deeper_than_the_bdev_is_pushed_back_not_dropped() {
    // The null bdev holds 4096 requests per channel, the uring ring 512: deeper
    // jobs wait for space (io_wait) and lose nothing.
    let v = perf_json(
        &[
            "--null", "N0:64", "-q", "6000", "-o", "512", "-w", "randread", "-t", "0.3",
        ],
        0,
    );
    assert_eq!(v["results"][0]["io_failed"], 0);
    assert!(v["results"][0]["iops"].as_f64().unwrap() > 6000.0);
    let dir = TempDir::new("pq");
    let img = dir.join("q.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let file = format!("Q0={}", img.display());
    let v = perf_json(
        &[
            "--file",
            &file,
            "--buffered",
            "-q",
            "1000",
            "-o",
            "4k",
            "-w",
            "verify",
            "-t",
            "0.3",
        ],
        0,
    );
    assert_eq!(v["results"][0]["io_failed"], 0);
}

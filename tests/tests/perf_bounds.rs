//! `bdev_perf_run` bounds the request buffers a run preallocates (queue depth
//! × I/O size × jobs, twice for verify): past 1 GiB it is refused with a clear
//! error before anything is allocated, and the daemon's memory does not move.

use serde_json::json;
use sluice_tests::{sluice_bin, Daemon};
use std::process::Command;

/// The daemon's resident set and its peak, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn perf_run_refuses_more_request_memory_than_the_bound() {
    let mut d = Daemon::start_with(&["-m", "0x1"], &[]);
    // 1 TiB of null device: every range fits, so only memory can be the limit.
    d.call(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 1u64 << 31, "block_size": 512}),
    );
    let (_, peak0) = rss_kib(d.pid());
    for (w, qd, io) in [
        // 1.5 GiB: small enough to try without the bound on a test machine.
        ("read", 384u64, 4u64 << 20),
        // The case: 64 TiB asked for.
        ("randwrite", 65536, 1 << 30),
        // verify holds a read-back buffer per request too: 2 x 768 MiB.
        ("verify", 192, 4 << 20),
    ] {
        let e = d.call_err(
            "bdev_perf_run",
            json!({"workload": w, "queue_depth": qd, "io_size": io, "time_in_sec": 0.2, "bdevs": ["N0"]}),
        );
        let msg = e["message"].as_str().unwrap_or_default();
        assert_eq!(e["code"], -32602, "{w} -q {qd} -o {io}: {e}");
        assert!(
            msg.contains("request buffers") && msg.contains("limit is 1073741824 bytes"),
            "{w} -q {qd} -o {io}: {e}"
        );
    }
    let (_, peak1) = rss_kib(d.pid());
    assert!(
        peak1 < peak0 + 64 * 1024,
        "refused runs moved the peak RSS from {peak0} KiB to {peak1} KiB"
    );
    // Under the bound a run goes ahead.
    let r = d.call(
        "bdev_perf_run",
        json!({"workload": "read", "queue_depth": 4, "io_size": 1 << 20, "time_in_sec": 0.2, "bdevs": ["N0"]}),
    );
    assert!(r.to_string().contains("N0"), "{r}");
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn local_perf_refuses_the_same() {
    let o = Command::new(sluice_bin())
        .args([
            "perf",
            "--null",
            "N0:65536",
            "-q",
            "65536",
            "-o",
            "1073741824",
        ])
        .args(["-w", "read", "-t", "0.3"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sluice perf");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "needs 70368744177664 bytes of request buffers; the limit is 1073741824 bytes"
        ),
        "{err}"
    );
}

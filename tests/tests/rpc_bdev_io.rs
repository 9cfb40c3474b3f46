//! The bdev methods against real I/O: qemu-io over an NBD export drives a
//! malloc bdev through an error bdev; `bdev_get_iostat` counts it (summed over
//! reactors, and per channel) and `bdev_error_inject_error` makes it fail.

use serde_json::{json, Value};
use sluice_tests::{qemu_io, run, Daemon};

fn stat<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {st}"))
}

#[test]
fn iostat_counts_io_and_injected_errors_fail_it() {
    let mut d = Daemon::start_with(&["-m", "0x3"], &[]);
    let nbd = d.dir.join("nbd.sock");
    d.call(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 2048, "block_size": 512}),
    );
    assert_eq!(
        d.call("bdev_error_create", json!({"base_name": "M0"})),
        true
    );
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": nbd.to_str().unwrap()}}),
    );
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "EE_M0", "writable": true}),
    );
    let uri = format!("nbd+unix:///EE_M0?socket={}", nbd.display());

    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "read 64k 4k",
        &uri,
    ]);
    let st = d.call("bdev_get_iostat", json!({"names": ["EE_M0", "M0"]}));
    assert!(
        st["tick_rate"].as_u64().unwrap() > 0 && st["ticks"].as_u64().unwrap() > 0,
        "{st}"
    );
    for name in ["EE_M0", "M0"] {
        let s = stat(&st, name);
        assert_eq!(s["num_write_ops"], 1, "{name}: {s}");
        assert_eq!(s["bytes_written"], 65536, "{name}: {s}");
        assert_eq!(s["num_read_ops"], 2, "{name}: {s}");
        assert_eq!(s["bytes_read"], 65536 + 4096, "{name}: {s}");
        assert!(s["read_latency_ticks"].as_u64().unwrap() > 0, "{name}: {s}");
    }
    // Per channel: the reactors' entries add up to the sum.
    let pc = d.call(
        "bdev_get_iostat",
        json!({"name": "M0", "per_channel": true}),
    );
    let chans = pc["channels"].as_array().unwrap();
    assert!(!chans.is_empty(), "{pc}");
    let reads: u64 = chans
        .iter()
        .map(|c| c["num_read_ops"].as_u64().unwrap())
        .sum();
    assert_eq!(reads, 2, "{pc}");

    // One injected read failure: the next read fails, the one after succeeds.
    assert_eq!(
        d.call(
            "bdev_error_inject_error",
            json!({"name": "EE_M0", "io_type": "read", "error_type": "failure", "num": 1})
        ),
        true
    );
    let out = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &uri]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error"),
        "injected read did not fail: {text}"
    );
    qemu_io(&["-f", "raw", "-c", "read -P 0x5a 0 4k", &uri]);
    let st = d.call("bdev_get_iostat", json!({"name": "EE_M0"}));
    assert_eq!(stat(&st, "EE_M0")["num_io_errors"], 1, "{st}");
    // Injection on a bdev that is not an error bdev: -19, as SPDK.
    let e = d.call_err(
        "bdev_error_inject_error",
        json!({"name": "M0", "io_type": "read", "error_type": "failure"}),
    );
    assert_eq!(e["code"], -19, "{e}");
}

#[test]
fn get_bdevs_waits_up_to_its_timeout_for_a_bdev() {
    let mut d = Daemon::start(&[]);
    let sock = d.rpc_sock.clone();
    let creator = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let out = std::process::Command::new(sluice_tests::sluice_bin())
            .args(["rpc", "-s"])
            .arg(&sock)
            .args([
                "bdev_null_create",
                "name=Late",
                "num_blocks=8",
                "block_size=512",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    });
    let t0 = std::time::Instant::now();
    let got = d.call("bdev_get_bdevs", json!({"name": "Late", "timeout": 10000}));
    assert_eq!(got[0]["name"], "Late");
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(250),
        "returned before the bdev existed"
    );
    creator.join().unwrap();
    let t0 = std::time::Instant::now();
    let e = d.call_err("bdev_get_bdevs", json!({"name": "Never", "timeout": 200}));
    assert_eq!(e["code"], -19);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(200));
}

/// SPDK's `thread_get_pollers`: every reactor with its pollers, counted.
/// Reads through a null bdev make its completion poller run and report busy.
#[test]
fn thread_get_pollers_counts_the_polls_that_did_work() {
    let mut d = Daemon::start_with(&["-m", "0x3"], &[]);
    let nbd = d.dir.join("nbd.sock");
    d.call(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 2048, "block_size": 512}),
    );
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": nbd.to_str().unwrap()}}),
    );
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "N0"}),
    );
    let uri = format!("nbd+unix:///N0?socket={}", nbd.display());
    let busy = |v: &Value| -> (u64, u64) {
        let mut n = (0, 0);
        for t in v["threads"].as_array().unwrap() {
            for p in t["active_pollers"].as_array().unwrap() {
                if p["name"] == "bdev_null_N0" {
                    n.0 += p["run_count"].as_u64().unwrap();
                    n.1 += p["busy_count"].as_u64().unwrap();
                }
            }
        }
        n
    };
    let before = d.call("thread_get_pollers", Value::Null);
    qemu_io(&[
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0 0 4k",
        "-c",
        "read -P 0 64k 4k",
        "-c",
        "read -P 0 512k 4k",
        &uri,
    ]);
    let v = d.call("thread_get_pollers", Value::Null);
    assert!(v["tick_rate"].as_u64().unwrap() > 0, "{v}");
    let threads = v["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2, "{v}");
    for (i, t) in threads.iter().enumerate() {
        assert_eq!(t["name"], format!("reactor_{i}"), "{v}");
        assert_eq!(t["id"], i as u64 + 1, "{v}");
        for kind in ["active_pollers", "timed_pollers", "paused_pollers"] {
            for p in t[kind].as_array().unwrap_or_else(|| panic!("{kind}: {v}")) {
                let (run, b) = (p["run_count"].as_u64(), p["busy_count"].as_u64());
                assert!(b <= run, "{p}");
                assert!(p["name"].is_string() && p["id"].is_u64(), "{p}");
                let want = if kind == "paused_pollers" {
                    "paused"
                } else {
                    "waiting"
                };
                assert_eq!(p["state"], want, "{p}");
                assert_eq!(
                    p.get("period_ticks").is_some(),
                    kind == "timed_pollers",
                    "{p}"
                );
            }
        }
    }
    let (run0, busy0) = busy(&before);
    let (run1, busy1) = busy(&v);
    assert!(run1 > run0, "the null bdev's poller did not run: {v}");
    assert!(
        (1..=3).contains(&(busy1 - busy0)),
        "three reads complete in one to three busy polls, not {}: {v}",
        busy1 - busy0
    );
    let e = d.call_err("thread_get_pollers", json!({"x": 1}));
    assert_eq!(e["code"], -32602, "{e}");
    d.stop();
}

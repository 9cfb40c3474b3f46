//! I/O limits through the real binary: SPDK's `bdev_set_qos_limit` and QEMU's
//! `block_set_io_throttle` held within 5% over 10 s under fio (NBD engine),
//! a neighbour device unaffected; both dialects' surfaces and refusals
//! (`tests/py/io_limits.py`, QEMU's words, QSD side by side for `object-add`).

mod nbd_common;

use nbd_common::*;
use serde_json::{json, Value};
use sluice_tests::{qemu_img, TempDir};
use std::process::{Command, Output};

fn have_fio() -> bool {
    let ok = Command::new("fio").arg("--version").output().is_ok();
    if !ok {
        eprintln!("fio missing; skipping");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI installs fio"
        );
    }
    ok
}

/// fio over NBD, `secs` long, JSON output.
fn fio(uri: &str, rw: &str, bs: &str, secs: u32) -> std::process::Child {
    Command::new("fio")
        .args([
            "--name=l",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--iodepth=16",
            "--time_based=1",
            &format!("--runtime={secs}"),
            "--size=32M",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fio")
}

/// (bytes per second, I/Os per second) of a finished fio, reads and writes together.
fn rates(o: Output) -> (f64, f64) {
    let so = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "fio: {so}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_str(&so[so.find('{').expect("json")..]).expect("fio json");
    let j = &v["jobs"][0];
    assert_eq!(j["error"], 0, "{so}");
    let bw = j["read"]["bw_bytes"].as_f64().unwrap() + j["write"]["bw_bytes"].as_f64().unwrap();
    let iops = j["read"]["iops"].as_f64().unwrap() + j["write"]["iops"].as_f64().unwrap();
    (bw, iops)
}

fn within(got: f64, want: f64, tol: f64, what: &str) {
    let r = got / want;
    eprintln!("{what}: {got:.0} for a limit of {want:.0} ({r:.3})");
    assert!(
        (r - 1.0).abs() <= tol,
        "{what}: {got:.0} vs {want:.0} ({r:.3})"
    );
}

/// SPDK's limit on one malloc node, exported over NBD and read and written
/// by fio for 10 s on two reactors: held within 5%; the neighbour exported
/// beside it (same reactors, same server) runs at several times the limit
/// all along, and the limit then lifted (0) lets the node run free again.
#[test]
fn spdk_qos_limit_holds_under_fio_and_spares_the_neighbour() {
    if !have_fio() {
        return;
    }
    let mut n = NbdDaemon::start(&["-m", "0x3"], &[]);
    n.malloc("m0", 64);
    n.malloc("m1", 64);
    n.export("m0", true);
    n.export("m1", true);
    n.d.call(
        "bdev_set_qos_limit",
        json!({"name": "m0", "rw_mbytes_per_sec": 8}),
    );
    let got = n.d.call("bdev_get_bdevs", json!({"name": "m0"}));
    assert_eq!(
        got[0]["assigned_rate_limits"],
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 8, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    let limited = fio(&n.uri("m0"), "randrw", "64k", 10);
    let neighbour = fio(&n.uri("m1"), "randrw", "64k", 10);
    let (bw, _) = rates(limited.wait_with_output().expect("fio"));
    let (nbw, _) = rates(neighbour.wait_with_output().expect("fio"));
    within(bw, 8.0 * 1048576.0, 0.05, "m0 limited to 8 MiB/s");
    eprintln!("neighbour m1: {:.1} MiB/s", nbw / 1048576.0);
    assert!(
        nbw > 4.0 * 8.0 * 1048576.0,
        "the neighbour ran at {nbw:.0} B/s, near the limit of its neighbour"
    );
    // Lifted: the node runs free (far above the old limit).
    n.d.call(
        "bdev_set_qos_limit",
        json!({"name": "m0", "rw_mbytes_per_sec": 0}),
    );
    let (free, _) = rates(
        fio(&n.uri("m0"), "randread", "64k", 2)
            .wait_with_output()
            .expect("fio"),
    );
    assert!(
        free > 4.0 * 8.0 * 1048576.0,
        "still limited after 0: {free:.0} B/s"
    );
}

/// QEMU's `block_set_io_throttle` on a device (a qcow2 image opened as
/// one) with an I/O-per-second limit and `iops_size`: held within 5% over
/// 10 s under fio with 4 KiB and 64 KiB requests mixed through the
/// device's NBD export; `query-block` shows it as QEMU does; the data
/// written under the limit is intact (`qemu-img check`).
#[test]
fn qemu_io_throttle_holds_under_fio() {
    if !have_fio() {
        return;
    }
    let dir = TempDir::new("thr");
    let img = dir.join("a.qcow2");
    let img = img.to_str().unwrap();
    qemu_img(&["create", "-f", "qcow2", img, "64M"]);
    let mut n = NbdDaemon::start(&["-m", "0x3"], &[]);
    n.d.call(
        "bdev_qcow2_open",
        json!({"name": "dev0", "node_name": "img0", "filename": img}),
    );
    n.export("dev0", true);
    n.d.call(
        "block_set_io_throttle",
        json!({"device": "dev0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
               "iops": 400, "iops_rd": 0, "iops_wr": 0, "iops_size": 8192}),
    );
    let blk = n.d.call("query-block", Value::Null);
    let ins = &blk
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "dev0")
        .unwrap()["inserted"];
    assert_eq!(
        (ins["iops"].as_u64(), ins["iops_size"].as_u64()),
        (Some(400), Some(8192))
    );
    assert_eq!(ins["group"], "dev0");
    // 4 KiB counts one operation, 64 KiB eight: two jobs, measured in bytes.
    let small = fio(&n.uri("dev0"), "randwrite", "4k", 10);
    let large = fio(&n.uri("dev0"), "randread", "64k", 10);
    let (_, s_iops) = rates(small.wait_with_output().expect("fio"));
    let (_, l_iops) = rates(large.wait_with_output().expect("fio"));
    within(
        s_iops + 8.0 * l_iops,
        400.0,
        0.05,
        "dev0 operations at iops_size 8k",
    );
    // All zero lifts the limits (QEMU's members disappear from `inserted`).
    n.d.call(
        "block_set_io_throttle",
        json!({"device": "dev0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
               "iops": 0, "iops_rd": 0, "iops_wr": 0}),
    );
    let blk = n.d.call("query-block", Value::Null);
    let ins = &blk
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "dev0")
        .unwrap()["inserted"];
    assert!(ins.get("group").is_none() && ins["iops"] == 0, "{ins}");
    n.d.call("block-export-del", json!({"id": "dev0"}));
    drop(n);
    let out = qemu_img(&["check", img]);
    assert!(out.contains("No errors"), "{out}");
}

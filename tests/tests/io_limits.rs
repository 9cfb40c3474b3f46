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

/// Four streams sharing one `throttle-group` object (`x-throttle-group`,
/// sluice's extension): their total rate is the group's within 5% over
/// about 10 s, each job's progress stays within 20% of the mean while all
/// run, and every streamed image reads as its chain did (`qemu-img compare`).
#[test]
fn streams_share_a_throttle_group() {
    let dir = TempDir::new("tg");
    let mut d = sluice_tests::Daemon::start_with(&["-m", "0x3"], &[]);
    const N: usize = 4;
    const MIB: u64 = 1 << 20;
    let per_job = 30 * MIB;
    let limit = 12 * MIB;
    let mut tops = Vec::new();
    for i in 0..N {
        let base = dir.join(&format!("b{i}.qcow2"));
        let top = dir.join(&format!("t{i}.qcow2"));
        let (base, top) = (
            base.to_str().unwrap().to_string(),
            top.to_str().unwrap().to_string(),
        );
        qemu_img(&["create", "-f", "qcow2", &base, "32M"]);
        sluice_tests::qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {} 0 30M", 0x10 + i),
            &base,
        ]);
        qemu_img(&["create", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top]);
        d.open_qcow2_chain(
            &format!("dev{i}"),
            &[(&format!("base{i}"), &base), (&format!("top{i}"), &top)],
            json!({}),
        );
        tops.push((base, top));
    }
    let e = d.call_err(
        "block-stream",
        json!({"device": "dev0", "x-throttle-group": "tg"}),
    );
    assert_eq!(e["message"], "Throttle group 'tg' does not exist");
    d.call(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg", "limits": {"bps-total": limit}}),
    );
    let t0 = std::time::Instant::now();
    for i in 0..N {
        d.call(
            "block-stream",
            json!({"device": format!("dev{i}"), "job-id": format!("j{i}"), "x-throttle-group": "tg"}),
        );
    }
    let e = d.call_err("object-del", json!({"id": "tg"}));
    assert_eq!(e["message"], "object 'tg' is in use, can not be deleted");
    let mut worst = 0.0f64;
    let mut baseline: Option<Vec<f64>> = None;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let jobs = d.call("query-block-jobs", Value::Null);
        let jobs = jobs.as_array().unwrap();
        if jobs.is_empty() {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "streams still running: {jobs:?}"
        );
        if jobs.len() == N {
            let offs: Vec<f64> = jobs.iter().map(|j| j["offset"].as_f64().unwrap()).collect();
            // Progress since the first look at which all four ran (the
            // first started a little before the others).
            let base = baseline.get_or_insert_with(|| offs.clone());
            let prog: Vec<f64> = offs.iter().zip(base.iter()).map(|(o, b)| o - b).collect();
            let mean = prog.iter().sum::<f64>() / N as f64;
            // Judged once the mean is five 2 MiB chunks or more, while none is done.
            if mean >= 10.0 * MIB as f64 && offs.iter().all(|o| *o < per_job as f64) {
                let dev = prog
                    .iter()
                    .map(|p| (p / mean - 1.0).abs())
                    .fold(0.0, f64::max);
                worst = worst.max(dev);
                eprintln!(
                    "progress (MiB): {:?}",
                    prog.iter()
                        .map(|p| (p / MIB as f64) as u64)
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // The group lets a tenth of a second's worth go at once.
    let want = (N as u64 * per_job) as f64 / limit as f64 - 0.1;
    within(secs, want, 0.05, "4 streams at 12 MiB/s together: seconds");
    eprintln!(
        "worst deviation of a job's progress from the mean: {:.1}%",
        worst * 100.0
    );
    assert!(
        worst <= 0.2,
        "unfair: a job's progress was {:.0}% off the mean",
        worst * 100.0
    );
    d.call("object-del", json!({"id": "tg"}));
    drop(d);
    for (base, top) in &tops {
        let out = qemu_img(&["compare", base, top]);
        assert!(out.contains("Images are identical"), "{out}");
    }
}

/// QEMU's throttle filter: `blockdev-add driver: throttle` over a null
/// node, in a group object, exported over NBD: fio's rate is the group's
/// within 5% over 10 s; the group cannot be deleted while the node uses it.
#[test]
fn throttle_node_holds_its_group_under_fio() {
    if !have_fio() {
        return;
    }
    let mut n = NbdDaemon::start(&["-m", "0x3"], &[]);
    n.d.call(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 64 << 20}),
    );
    let e = n.d.call_err(
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "t0", "throttle-group": "g", "file": "n0"}),
    );
    assert_eq!(e["message"], "Throttle group 'g' does not exist");
    n.d.call(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "g", "x-iops-total": 300}),
    );
    n.d.call(
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "t0", "throttle-group": "g", "file": "n0"}),
    );
    n.export("t0", true);
    let (_, iops) = rates(
        fio(&n.uri("t0"), "randrw", "4k", 10)
            .wait_with_output()
            .expect("fio"),
    );
    within(iops, 300.0, 0.05, "throttle node at 300 iops");
    let e = n.d.call_err("object-del", json!({"id": "g"}));
    assert_eq!(e["message"], "object 'g' is in use, can not be deleted");
    n.d.call("block-export-del", json!({"id": "t0"}));
    n.wait_exports(|v| v.as_array().is_some_and(|a| a.is_empty()));
    n.d.call("blockdev-del", json!({"node-name": "t0"}));
    n.d.call("object-del", json!({"id": "g"}));
}

/// Both dialects' surfaces (`tests/py/io_limits.py`): QSD side by side for
/// `object-add` / `object-del` / `blockdev-add driver: throttle`, QEMU's
/// words for `block_set_io_throttle`, SPDK's client for `bdev_set_qos_limit`.
#[test]
fn limit_surfaces_match_qemu_and_spdk() {
    let d = sluice_tests::Daemon::start(&[]);
    println!("{}", d.run_case("io_limits.py", "qmp"));
    println!("{}", d.run_case("io_limits.py", "spdk"));
}

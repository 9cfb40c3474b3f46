//! An NBD client keeps doing verified I/O on a device while it is snapshotted
//! onto a new overlay and the overlay is then streamed (its backing dropped).

mod nbd_common;

use nbd_common::*;
use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, TempDir};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn client_io_across_snapshot_switch_and_stream() {
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("fio missing; skipping");
        return;
    }
    let tmp = TempDir::new("strm");
    let base = tmp.join("base.qcow2");
    let top = tmp.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-f", "qcow2", b, "32M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x11 0 8M", b]);
    let mut n = NbdDaemon::start(&["-m", "0x3"], &[]);
    n.d.call("bdev_qcow2_open", json!({"name": "vd0", "filename": b}));
    n.export("vd0", true);
    let uri = n.uri("vd0");
    // fio writes and verifies (as it goes and at the end) in 8M..32M while the
    // device moves under it.
    let fio = Command::new("fio")
        .args([
            "--name=follow",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=8M",
            "--size=24M",
            "--io_size=48M",
            "--verify=crc32c",
            "--verify_backlog=128",
            "--do_verify=1",
            "--verify_state_save=0",
            "--verify_fatal=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_millis(300));
    n.d.call(
        "blockdev-snapshot-sync",
        json!({"device": "vd0", "snapshot-file": t, "format": "qcow2"}),
    );
    n.d.call("block-stream", json!({"device": "vd0", "job-id": "s0"}));
    let t0 = Instant::now();
    loop {
        let jobs = n.d.call("query-block-jobs", Value::Null);
        if jobs.as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "stream did not finish: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fio.wait_with_output().expect("fio");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio: {so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("err= 0"), "{so}");
    // The base's data reads back through the export, now from the streamed top.
    qemu_io(&["-f", "raw", "-r", "-c", "read -P 0x11 0 8M", &uri]);
    let info = qemu_img(&["info", "-U", "--output=json", t]);
    let v: Value = serde_json::from_str(&info).expect("json");
    assert!(
        v.get("backing-filename").is_none(),
        "stream dropped the backing file: {info}"
    );
    let q = n.d.call("query-block-exports", Value::Null);
    assert_eq!(
        q[0]["node-name"], "vd0",
        "the export still names the device: {q}"
    );
}

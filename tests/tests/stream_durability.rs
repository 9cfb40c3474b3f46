//! What a completed stream leaves if the daemon is killed (SIGKILL) the moment
//! the job has ended: with the default durable completion and with
//! `x-durable: false` (no flush, QEMU's behaviour) the top image has no backing
//! file, `qemu-img check` accepts it and it reads exactly as the chain did.
//! (qemu-storage-daemon, killed at the same point, loses the copied clusters:
//! scripts/bench/stream_kill_after_complete.sh.)

use serde_json::json;
use sluice_tests::{qemu_img, qemu_io, run, Daemon, TempDir};
use std::time::{Duration, Instant};

fn chain(work: &TempDir) -> [String; 3] {
    let p = |n: &str| work.join(n).to_str().unwrap().to_string();
    let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "64M"]);
    qemu_io(&[
        "-c",
        "write -P 0x11 0 24M",
        "-c",
        "write -P 0x12 40M 8M",
        &base,
    ]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid,
    ]);
    qemu_io(&["-c", "write -P 0x21 8M 8M", "-c", "write -z 44M 1M", &mid]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top,
    ]);
    qemu_io(&["-c", "write -P 0x31 12M 1M", &top]);
    std::fs::copy(&top, work.join("top.orig")).unwrap();
    [base, mid, top]
}

fn stream_then_kill(durable: Option<bool>) {
    let work = TempDir::new("durability");
    let [base, mid, top] = chain(&work);
    let mut d = Daemon::start(&[]);
    d.open_qcow2_chain(
        "vd0",
        &[("base0", &base), ("mid0", &mid), ("top0", &top)],
        json!({"direct": false}),
    );
    let mut args = json!({"job-id": "s0", "device": "vd0"});
    if let Some(v) = durable {
        args["x-durable"] = json!(v);
    }
    d.call("block-stream", args);
    let t0 = Instant::now();
    while d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the stream never ended"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    d.kill();
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &top])).unwrap();
    assert!(
        info.get("backing-filename").is_none(),
        "x-durable {durable:?}: the header still names a backing file: {info}"
    );
    let out = run("qemu-img", &["check", &top]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "x-durable {durable:?}: qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let orig = work.join("top.orig");
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            orig.to_str().unwrap(),
            &top,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "x-durable {durable:?}: the streamed image reads differently: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sigkill_right_after_a_durable_stream_keeps_everything() {
    stream_then_kill(None);
}

#[test]
fn sigkill_right_after_an_unflushed_stream_keeps_everything() {
    stream_then_kill(Some(false));
}

#[test]
fn x_durable_must_be_a_boolean() {
    let work = TempDir::new("durability-bad");
    let [base, mid, top] = chain(&work);
    let mut d = Daemon::start(&[]);
    d.open_qcow2_chain(
        "vd0",
        &[("base0", &base), ("mid0", &mid), ("top0", &top)],
        json!({}),
    );
    let e = d.call_err(
        "block-stream",
        json!({"job-id": "s0", "device": "vd0", "x-durable": "no"}),
    );
    assert!(
        e.to_string().contains("x-durable") || e.to_string().contains("invalid type"),
        "{e}"
    );
    assert_eq!(d.call("query-block-jobs", json!({})), json!([]));
}

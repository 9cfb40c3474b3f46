//! `sluice rpc block-stream ... --wait` (and the 2011 `block_stream`): a
//! progress bar on stderr, the completion event on stdout, the exit status.

use serde_json::Value;
use sluice_tests::{qemu_img, qemu_io, Daemon, TempDir};

fn chain(w: &TempDir, tag: &str) -> String {
    let base = w.join(&format!("{tag}-base.qcow2"));
    let top = w.join(&format!("{tag}-top.qcow2"));
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "32M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 0 24M", b]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t, "32M",
    ]);
    t.to_string()
}

fn event(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the event ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    })
}

#[test]
fn wait_shows_progress_and_ends_with_the_completion_event() {
    let mut d = Daemon::start(&[]);
    let w = TempDir::new("cli");
    let top = chain(&w, "a");
    d.call(
        "bdev_qcow2_open",
        serde_json::json!({"name": "drive0", "filename": top}),
    );
    let out = d.cli(&["block-stream", "device=drive0", "speed=16777216", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let ev = event(&out.stdout);
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED");
    assert_eq!(ev["data"]["offset"], ev["data"]["len"]);
    assert_eq!(ev["data"]["len"], 32 << 20);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("100.0%") && err.contains("MiB/s") && err.contains("ETA"),
        "{err}"
    );

    let top2 = chain(&w, "b");
    d.call(
        "bdev_qcow2_open",
        serde_json::json!({"name": "drive1", "filename": top2}),
    );
    let out = d.cli(&["block_stream", "device=drive1", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let ev = event(&out.stdout);
    assert_eq!(ev["event"], "BLOCK_STREAM_COMPLETED");
    assert_eq!(
        ev["data"],
        serde_json::json!({"device": "drive1", "len": 32 << 20, "offset": 32 << 20})
    );

    // A failing command fails before waiting.
    let out = d.cli(&["block-stream", "device=nope", "--wait"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot find device='nope'"));
}

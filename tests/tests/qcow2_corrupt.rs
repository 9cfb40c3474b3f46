//! Damaged qcow2 images are not made worse, end to end through the real
//! daemon: metadata overlap checks (QEMU's `overlap-check`) refuse a write that
//! would overwrite metadata, mark the image corrupt and tell QMP clients
//! (`BLOCK_IMAGE_CORRUPTED`), reads go on (tests/py/qcow2_corrupt.py, qemu-io
//! over NBD, qemu-img judging); and an image file that fails the checks of an
//! open is left exactly as it was, never extended or trimmed.

use serde_json::json;
use sluice_tests::{check, qemu_img, qemu_io, Daemon, TempDir};
use std::io::Read;

/// Stops the daemon and fails on a panic in its log.
fn stop_clean(d: Daemon) {
    let mut d = d;
    let mut err = String::new();
    let pid = d.pid();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = d.child.wait();
    if let Some(e) = d.child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!err.contains("panicked"), "the daemon panicked:\n{err}");
}

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "qcow2_corrupt.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("qcow2_corrupt.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
    stop_clean(d);
}

#[test]
fn self_referencing_l2() {
    scenario("self_referencing_l2");
}

#[test]
fn overlap_check_modes() {
    scenario("overlap_check_modes");
}

#[test]
fn blockdev_add_overlap_check() {
    scenario("blockdev_add_overlap_check");
}

/// An image cut to 8191 bytes (its tables lie past the end) is refused by a
/// writable open as by a read-only one, and the file is not touched. (QEMU
/// opens it and reads zeroes past the end; sluice refuses both ways.)
#[test]
fn truncated_image_is_refused_and_left_alone() {
    let work = TempDir::new("trunc");
    let p = work.join("t.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_io(&["-c", "write -P 0x5a 0 256k", ps]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(8191).unwrap();
    drop(f);
    let before = std::fs::read(&p).unwrap();
    let mut d = Daemon::start(&[]);
    for ro in [true, false] {
        let e = d.call_err(
            "bdev_qcow2_open",
            json!({"name": "vd0", "filename": ps, "read_only": ro}),
        );
        let msg = e["message"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains("past the end of the image"),
            "read_only {ro}: {e}"
        );
        let now = std::fs::read(&p).unwrap();
        assert_eq!(now.len(), 8191, "read_only {ro}: the file's length changed");
        assert!(now == before, "read_only {ro}: the file's bytes changed");
    }
    // Nothing was registered by the refused opens.
    let bdevs = d.call("bdev_get_bdevs", json!({}));
    assert_eq!(bdevs, json!([]), "{bdevs}");
    stop_clean(d);
}

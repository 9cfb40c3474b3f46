//! A full disk, end to end: the image sluice writes lives on a small tmpfs
//! that a filler file has all but filled (mounting needs root; without it the
//! tests say so and pass). A stream job meets ENOSPC and stops (on-error
//! enospc, then completes once space is freed) or fails (report) without
//! damaging the image; an NBD client writing until the disk is full gets
//! ENOSPC, the daemon keeps serving, and every acknowledged write is in the
//! image after a clean shutdown. Scenarios in `tests/py/full_disk.py`; images
//! judged by `qemu-img check` / `compare` / `qemu-io`.

use serde_json::Value;
use sluice_tests::{check, qemu_img, qemu_io, run, Daemon, TempDir};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory; unmounted (lazily) on drop, also when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `dir` (created). `None` when mounting is
    /// not allowed (not root).
    fn mount(dir: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("create mount point");
        let size = format!("size={mib}M");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(dir)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs(dir.to_path_buf())),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        eprintln!("cannot mount a tmpfs ({why}); skipping the full-disk test");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

/// The daemon answers, then stops cleanly on SIGTERM without having panicked.
fn alive_then_stop(mut d: Daemon) {
    let v = d.call("spdk_get_version", Value::Null);
    assert!(v.get("version").is_some(), "{v}");
    d.call("query-block", Value::Null);
    let mut stderr = d.child.stderr.take().expect("daemon stderr");
    let code = d.stop();
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    eprintln!("daemon stderr:\n{err}");
    assert!(!err.contains("panicked"), "the daemon panicked:\n{err}");
    assert_eq!(code, Some(0), "daemon exit status; stderr:\n{err}");
}

/// Runs a scenario of `full_disk.py` with its images on a `mib` MiB tmpfs
/// (0: a plain directory), checks the daemon survived it and stops it, then
/// runs `then(work dir, mount)`.
fn scenario(case: &str, mib: u64, then: impl FnOnce(&Path, &Path)) {
    let work = TempDir::new(case);
    let mnt = work.join("mnt");
    let fs = if mib == 0 {
        std::fs::create_dir_all(&mnt).expect("create mnt");
        None
    } else {
        match Tmpfs::mount(&mnt, mib) {
            Some(fs) => Some(fs),
            None => return,
        }
    };
    let d = Daemon::start(&[]);
    let out = check(
        d.python(
            "full_disk.py",
            &[
                "--dir",
                work.0.to_str().unwrap(),
                "--mnt",
                mnt.to_str().unwrap(),
                "--case",
                case,
            ],
        ),
        &format!("full_disk.py --case {case}"),
    );
    println!("{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
    alive_then_stop(d);
    then(&work.0, &mnt);
    drop(fs);
}

#[test]
fn stream_on_error_enospc_stops_then_completes() {
    scenario("stream_enospc", 48, |_, _| {});
}

#[test]
fn stream_on_error_report_fails_cleanly() {
    scenario("stream_report", 48, |_, _| {});
}

/// `qemu-img check` finds nothing (no corruption, no leak) and every write the
/// client was told succeeded (DIR/acked.json) reads back from the image.
fn verify_acked(work: &Path, _mnt: &Path) {
    let acked: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("acked.json")).unwrap()).unwrap();
    let img = acked["image"].as_str().unwrap();
    let out = qemu_img(&["check", "--output=json", img]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(v["check-errors"], 0, "{v}");
    assert_eq!(v.get("corruptions"), None, "{v}");
    assert_eq!(v.get("leaks"), None, "{v}");
    let writes = acked["writes"].as_array().unwrap();
    assert!(!writes.is_empty());
    let cmds: Vec<String> = writes
        .iter()
        .map(|a| format!("read -P {} {} {}", a["pattern"], a["offset"], a["len"]))
        .collect();
    let mut args = vec!["-r", "-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(img);
    qemu_io(&args);
}

#[test]
fn nbd_writes_until_full() {
    scenario("nbd_writes", 24, verify_acked);
}

#[test]
fn nbd_writes_until_full_small_clusters_then_space_freed() {
    scenario("nbd_writes_small_clusters", 32, verify_acked);
}

#[test]
fn metadata_write_enospc_then_space_again() {
    // The error bdev makes the ENOSPC: no tmpfs (nor root) needed.
    scenario("metadata_enospc", 0, verify_acked);
}

//! A real guest on a sluice disk that moves under it
//! (`scripts/vm/vhost/run.sh`): QEMU 7.2 under TCG boots a Debian kernel whose
//! data disk sluice serves, once over vhost-user-blk (guest memory a shared
//! memfd, 2 queues) and once over NBD (QEMU's nbd client behind virtio-blk).
//! The guest makes ext4 and writes and rewrites checksummed files in a loop
//! while the host runs blockdev-snapshot-sync, block-stream, a mirror with
//! pivot and an active commit with pivot over QMP; the guest then checks every
//! file, `fsck -n` and its kernel log for I/O errors; the host checks the final
//! image with qemu-img and compares its contents with the guest's whole disk.
//!
//! Skipped (with a message) only when the QEMU packages are neither in
//! `scripts/vm/cache` nor downloadable (exit 77); under `CI=true` that skip
//! fails. Built in the test's profile (debug under `cargo test`).

use sluice_tests::{workspace_root, TempDir};
use std::process::Command;
use std::time::Instant;

const SKIP: i32 = 77;

fn guest(mode: &str) {
    let dir = TempDir::new(&format!("vm-{mode}"));
    let profile = std::env::var("SLUICE_PROFILE").unwrap_or_else(|_| {
        if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        }
        .to_string()
    });
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/vm/vhost/run.sh"))
        .arg(mode)
        .env("SLUICE_PROFILE", &profile)
        .env("VM_SKIP_BUILD", "1")
        .env("VM_RUN", &dir.0)
        .env(
            "VM_TIMEOUT",
            std::env::var("VM_TIMEOUT").unwrap_or_else(|_| "600".into()),
        )
        .output()
        .expect("run scripts/vm/vhost/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(SKIP) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the QEMU packages cannot be had under CI:\n{stderr}"
        );
        eprintln!("SKIPPED guest over {mode}: the QEMU packages cannot be downloaded\n{stderr}");
        return;
    }
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let tail: Vec<&str> = console.lines().collect();
    let tail = tail[tail.len().saturating_sub(60)..].join("\n");
    assert!(
        out.status.success()
            && stdout.contains("SLUICE-VM-RESULT: PASS")
            && stdout.contains("SLUICE-VM-HOST: PASS"),
        "scripts/vm/vhost/run.sh {mode} failed ({:?}):\n{stdout}\n--- stderr\n{stderr}\n--- console (tail)\n{tail}",
        out.status
    );
    eprintln!(
        "{stdout}(run.sh {mode} took {:.0} s, {profile} build)",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn guest_on_vhost_user_blk_never_notices_its_disk_moving() {
    guest("vhost");
}

#[test]
fn guest_on_nbd_never_notices_its_disk_moving() {
    guest("nbd");
}

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

use sluice_tests::{run_guest, vm_profile, TempDir};

fn guest(mode: &str) {
    let dir = TempDir::new(&format!("vm-{mode}"));
    let Some(run) = run_guest("scripts/vm/vhost/run.sh", &[mode], &dir, true) else {
        return;
    };
    eprintln!(
        "{}(run.sh {mode} took {:.0} s, {} build)",
        run.stdout,
        run.secs,
        vm_profile()
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

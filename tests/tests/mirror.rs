//! The mirror end to end through `qemu.qmp` (tests/py/mirror.py): the same
//! QMP conversation on qemu-storage-daemon 10 and on sluice, compared step
//! by step (replies, refusals, events in order including BLOCK_JOB_READY);
//! targets judged by `qemu-img compare` / `check`; a mirror under verified
//! NBD client I/O across the pivot; write-blocking converging under load;
//! targets in RAM and on another NBD server.

use sluice_tests::Daemon;

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    println!("{}", d.run_case("mirror.py", case));
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn mirror_conversation_matches_qsd() {
    scenario("qsd");
}

#[test]
fn mirror_under_verified_nbd_client_io_pivots_the_export() {
    scenario("nbd_io");
}

#[test]
fn write_blocking_mirror_converges_under_a_write_load() {
    scenario("write_blocking");
}

#[test]
fn drive_mirror_conversation_matches_qsd() {
    scenario("drive");
}

#[test]
fn drive_mirror_pivots_an_export_onto_the_new_image() {
    scenario("drive_pivot");
}

#[test]
fn libvirt_blockcopy_shallow_pivot_matches_qsd() {
    scenario("libvirt");
}

#[test]
fn cancel_once_ready_leaves_a_consistent_copy_of_that_moment() {
    scenario("soft_cancel");
}

#[test]
fn on_target_error_stop_pauses_and_resume_converges() {
    scenario("target_errors");
}

#[test]
fn a_named_device_moves_onto_the_target_at_complete() {
    scenario("device");
}

#[test]
fn mirror_onto_ram_and_onto_a_remote_nbd_node() {
    scenario("targets");
}

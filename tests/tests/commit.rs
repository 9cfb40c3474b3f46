//! `block-commit` end to end through `qemu.qmp` (tests/py/commit.py): the
//! same QMP conversation on qemu-storage-daemon 10 and on sluice, compared
//! step by step (replies, refusals, events in order, the graph after);
//! images judged by `qemu-img compare` / `check`; a commit while an NBD
//! client does verified I/O on the device; the active layer refused.

use sluice_tests::Daemon;

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    d.run_case("commit.py", case);
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn commit_conversation_matches_qsd() {
    scenario("qsd");
}

#[test]
fn commit_under_verified_nbd_client_io() {
    scenario("nbd_io");
}

#[test]
fn active_commit_under_verified_nbd_client_io_pivots_the_export() {
    scenario("active_nbd");
}

#[test]
fn active_commit_conversation_matches_qsd() {
    scenario("active_qsd");
}

#[test]
fn commits_on_a_named_device_move_it_onto_base() {
    scenario("device");
}

#[test]
fn an_export_added_during_an_active_commit_fails_the_pivot_safely() {
    scenario("active_new_export");
}

//! `block-commit` end to end through `qemu.qmp` (tests/py/commit.py): the
//! same QMP conversation on qemu-storage-daemon 10 and on sluice, compared
//! step by step (replies, refusals, events in order, the graph after);
//! images judged by `qemu-img compare` / `check`; a commit while an NBD
//! client does verified I/O on the device; the active layer refused.

use sluice_tests::{check, Daemon, TempDir};
use std::io::Read;

fn scenario(case: &str) {
    let mut d = Daemon::start(&[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "commit.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("commit.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
    let mut stderr = d.child.stderr.take().expect("daemon stderr");
    let code = d.stop();
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(!err.contains("panicked"), "the daemon panicked:\n{err}");
    assert_eq!(code, Some(0), "daemon exit status; stderr:\n{err}");
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

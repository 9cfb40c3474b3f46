//! libvirt's block operations as the QMP sequences libvirt sends
//! (tests/py/libvirt_flows.py): `blockcommit --active --pivot`, an
//! intermediate `blockcommit` (the chain added as libvirt adds it, read-only
//! below the top: the commit reopens its base read-write and back), one
//! refused because base cannot be written, `blockpull` and a disk-only snapshot through
//! `transaction`, each run on qemu-storage-daemon 10 and on sluice and
//! compared step by step (replies, events in order, the nodes libvirt
//! probes); images judged by `qemu-img check` / `compare` after.

use sluice_tests::Daemon;

fn flow(case: &str) {
    let d = Daemon::start(&[]);
    let out = d.run_case("libvirt_flows.py", case);
    for skip in out.lines().filter(|l| l.starts_with("SKIP")) {
        eprintln!("{case}: {skip}");
    }
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn blockcommit_active_pivot_matches_qsd() {
    flow("active_commit");
}

/// `blockjob --abort` once ready: no pivot, base read-only again with its
/// reader's lock.
#[test]
fn blockcommit_active_abort_matches_qsd() {
    flow("active_commit_abort");
}

#[test]
fn blockcommit_intermediate_matches_qsd() {
    flow("intermediate_commit");
}

/// mid2 into base on a chain of four: the overlay above top is read-only
/// too (its header rewritten, read-only before, during and after).
#[test]
fn blockcommit_below_a_read_only_overlay_matches_qsd() {
    flow("deep_intermediate_commit");
}

/// The base's file cannot be opened for writing (`chattr +i`): the reopen
/// is refused in QEMU's words and the chain stays as it was (skipped, with
/// the reason printed, where the immutable flag cannot be set).
#[test]
fn blockcommit_of_an_unwritable_base_refused_as_qsd() {
    flow("commit_refused");
}

#[test]
fn blockpull_matches_qsd() {
    flow("pull");
}

#[test]
fn snapshot_through_transaction_matches_qsd() {
    flow("snapshot");
}

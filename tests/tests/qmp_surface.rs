//! QMP surface commands end to end through `qemu.qmp` (tests/py/qmp_surface.py):
//! `block_resize`, `transaction` and `query-named-block-nodes` conversations run
//! on qemu-storage-daemon 10 and on sluice and compared step by step (replies,
//! refusals in QEMU's words); images judged by `qemu-img check` / `info` /
//! `compare` afterwards.

use sluice_tests::Daemon;

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    d.run_case("qmp_surface.py", case);
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn block_resize_matches_qsd() {
    scenario("resize");
}

#[test]
fn transaction_is_all_or_nothing_as_in_qsd() {
    scenario("transaction");
}

#[test]
fn query_named_block_nodes_matches_qsd_flat_or_not() {
    scenario("named_nodes");
}

#[test]
fn query_qmp_schema_is_true_of_the_binary() {
    scenario("schema");
}

#[test]
fn a_failed_transaction_leaves_a_device_on_its_image() {
    scenario("transaction_device");
}

#[test]
fn spdk_null_resize_grows_a_null_bdev() {
    scenario("null_resize");
}

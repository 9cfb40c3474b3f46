//! sluice's NBD client end to end (tests/py/nbd_client.py): `blockdev-add`
//! with driver `nbd` against qemu-nbd, qemu-storage-daemon's export and
//! sluice's own server (data judged on the server's side, block status equal
//! to `qemu-img map`), QEMU's errors compared with QSD's, a stream of an
//! overlay whose backing is on an NBD server, reconnection, and a fake server
//! answering garbage.

use sluice_tests::Daemon;

fn scenario(case: &str) {
    let d = Daemon::start_with(&["-m", "0x3"], &[]);
    d.run_case("nbd_client.py", case);
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn data_and_block_status_against_qemu_nbd() {
    scenario("qemu_nbd");
}

#[test]
fn data_and_block_status_against_qsd_export() {
    scenario("qsd_export");
}

#[test]
fn data_against_sluices_own_server() {
    scenario("own_server");
}

#[test]
fn blockdev_add_errors_match_qsd() {
    scenario("errors_match_qsd");
}

#[test]
fn stream_over_nbd_backing_skips_holes() {
    scenario("stream_over_nbd");
}

#[test]
fn server_restarted_within_reconnect_delay_and_gone_for_good() {
    scenario("reconnect");
}

#[test]
fn stream_with_server_gone_reports_the_error() {
    scenario("stream_server_gone");
}

#[test]
fn garbage_from_a_fake_server_drops_the_connection() {
    scenario("garbage");
}

#[test]
fn backing_named_by_json_and_tcp_uri_opens_over_nbd() {
    scenario("json_backing");
}

#[test]
fn open_timeout_waits_for_the_server() {
    scenario("open_timeout");
}

#[test]
fn fio_verified_io_through_the_client_from_two_reactors() {
    scenario("fio_verify");
}

//! TLS for NBD end to end (tests/py/nbd_tls.py): sluice's server with QEMU's
//! TLS clients, sluice's client with qemu-storage-daemon and qemu-nbd, sluice
//! with itself (multi-conn over TLS), the refusals in QEMU's words compared
//! with qemu-storage-daemon's, and `object-add` / `object-del` answers equal
//! to QSD's. Certificates are made with openssl in each case.

use sluice_tests::Daemon;

fn scenario(case: &str) {
    let d = Daemon::start_with(&["-m", "0x3"], &[]);
    d.run_case("nbd_tls.py", case);
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn sluice_server_with_qemu_tls_clients_and_refusals() {
    scenario("sluice_server");
}

#[test]
fn tls_object_and_start_errors_match_qsd() {
    scenario("errors_match_qsd");
}

#[test]
fn sluice_client_with_qsd_tls_server() {
    scenario("sluice_client_qsd");
}

#[test]
fn sluice_to_sluice_and_qemu_nbd_multi_conn_over_tls() {
    scenario("sluice_to_sluice_multiconn");
}

//! The vhost-user-blk export end to end (tests/py/vhost_blk.py with the test
//! front end tests/py/vhost_client.py): verified I/O over two queues on two
//! reactors judged by qemu-img compare; hostile front ends beside a healthy
//! one; the QMP conversation and the same verified I/O compared with
//! qemu-storage-daemon 10; SPDK's vhost controller methods; SPDK's interrupt
//! coalescing (signals held back, never lost); an export following its node
//! onto a snapshot overlay; no wake-up lost by a reactor that parks as soon
//! as it idles.

use sluice_tests::Daemon;

fn scenario(case: &str) {
    let d = Daemon::start_with(&["-m", "0x3"], &[]);
    println!("{}", d.run_case("vhost_blk.py", case));
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn verified_io_over_two_queues_matches_the_image() {
    scenario("verified_io");
}

#[test]
fn hostile_front_ends_leave_the_service_and_a_healthy_guest_going() {
    scenario("hostile");
}

#[test]
fn export_conversation_and_device_match_qsd() {
    scenario("qsd");
}

#[test]
fn spdk_vhost_controller_methods() {
    scenario("spdk");
}

#[test]
fn spdk_interrupt_coalescing_holds_signals_back_and_never_loses_one() {
    scenario("coalescing");
}

#[test]
fn export_follows_its_node_onto_a_snapshot() {
    scenario("snapshot");
}

#[test]
fn a_reactor_parking_at_once_loses_no_kick_completion_or_signal() {
    let d = Daemon::start_with(&["-m", "0x1"], &["--park-after-us", "0"]);
    println!("{}", d.run_case("vhost_blk.py", "parked"));
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

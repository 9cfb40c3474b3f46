//! sluice's Ceph RBD driver end to end (tests/py/rbd.py), each scenario on
//! a throwaway single-node cluster of its own (scripts/ceph/cluster.sh):
//! data and block status against librbd's tools and QEMU's rbd driver,
//! QEMU's errors, SPDK's bdev_rbd_* methods, rapid deployment (ten overlays
//! on one RBD golden image streamed under client writes), evacuation onto
//! RBD by mirror with a pivot and by snapshot plus stream, and the OSD
//! killed mid-stream and restarted on its data (a BlueStore cluster: requests
//! wait; with an op timeout, on-error stop pauses the job and a resume
//! completes it; a new stream completes). Rapid deployment on NVMe in the
//! guest harness, the guest's sluice reaching a cluster like these over the
//! network, is `tests/tests/vm_nvme.rs` (`scripts/vm/rbd/run.sh`).
//!
//! Needs sluice built with librbd (librbd-dev, librados-dev) and the Ceph
//! daemons (ceph-mon, ceph-osd, ceph-common); `scripts/ceph/install.sh`
//! installs them. Without them each test says why and passes, except under
//! `CI=true`, where CI installs them and a skip fails.

use sluice_tests::Daemon;
use std::path::Path;

/// Why the RBD tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if !rbd::available() {
        return Some("sluice was built without librbd (librbd-dev, librados-dev)".into());
    }
    for t in ["ceph-mon", "ceph-osd", "ceph", "rbd"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(t).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{t} is not installed (ceph-mon, ceph-osd, ceph-common)"
            ));
        }
    }
    None
}

fn scenario(case: &str) {
    if let Some(why) = missing() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI installs the RBD test dependencies, but {why}"
        );
        eprintln!("SKIP rbd::{case}: {why}");
        return;
    }
    let d = Daemon::start_with(&["-m", "0x3"], &[]);
    d.run_case("rbd.py", case);
    assert_eq!(d.stop(), Some(0), "daemon exit status");
}

#[test]
fn data_block_status_and_interop_with_librbd_and_qemu() {
    scenario("data_interop");
}

#[test]
fn blockdev_add_errors_match_qsd() {
    scenario("errors");
}

#[test]
fn spdk_bdev_rbd_methods() {
    scenario("spdk_methods");
}

#[test]
fn rapid_deployment_ten_overlays_streamed_under_writes() {
    scenario("rapid_deploy");
}

#[test]
fn evacuation_onto_rbd_by_mirror_with_pivot() {
    scenario("evacuate");
}

#[test]
fn evacuation_onto_rbd_by_snapshot_and_stream() {
    scenario("evacuate_snapshot");
}

#[test]
fn osd_killed_and_restarted_mid_stream_reads_wait_then_the_stream_completes() {
    scenario("osd_outage");
}

#[test]
fn osd_killed_with_op_timeout_pauses_on_error_stop_then_resumes_after_restart() {
    scenario("osd_outage_on_error_stop");
}

#[test]
fn exit_closes_images_and_releases_their_locks() {
    scenario("exit_releases_image");
}

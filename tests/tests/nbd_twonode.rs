//! Issue 15's two-node scenarios (tests/py/nbd_twonode.py): two `sluice
//! serve` processes (or qemu-storage-daemon in one role), each in its own
//! network namespace joined by a veth pair, NBD over TCP and TLS; results
//! judged with qemu-img compare against an independent reference and
//! qemu-img check. Needs root (network namespaces): skipped with the reason
//! otherwise, failed under CI=true.

use sluice_tests::{python, sluice_bin, workspace_root, TempDir};
use std::process::Command;

fn scenario(case: &str) {
    let work = TempDir::new(case);
    let out = Command::new(python())
        .arg(workspace_root().join("tests/py/nbd_twonode.py"))
        .arg("--bin")
        .arg(sluice_bin())
        .arg("--dir")
        .arg(&work.0)
        .arg("--case")
        .arg(case)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "nbd_twonode.py --case {case}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for l in stdout.lines().filter(|l| *l != "ok") {
        eprintln!("{case}: {l}");
    }
}

#[test]
fn postcopy_migration_over_tls_sluice_to_sluice() {
    scenario("postcopy_tls_sluice");
}

#[test]
fn postcopy_migration_over_tls_from_qsd() {
    scenario("postcopy_tls_qsd_source");
}

#[test]
fn precopy_mirror_write_blocking_into_sluice() {
    scenario("precopy_sluice");
}

#[test]
fn precopy_mirror_write_blocking_into_qsd() {
    scenario("precopy_qsd_dest");
}

#[test]
fn rapid_deployment_ten_overlays_on_one_golden_export() {
    scenario("rapid_deployment");
}

#[test]
fn faults_link_down_and_source_killed_mid_stream() {
    scenario("faults");
}

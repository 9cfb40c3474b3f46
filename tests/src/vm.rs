//! The QEMU guest harnesses (`scripts/vm/run.sh`, `scripts/vm/vhost/run.sh`,
//! `scripts/vm/rbd/run.sh`) run from a test: the script in a folder of the
//! test's own, the binaries of the test's profile, the verdict lines judged
//! here once for all of them.

use crate::{workspace_root, TempDir};
use std::process::Command;
use std::time::Instant;

/// What a harness script exits with when what it needs (the QEMU packages,
/// the Ceph daemons, a sluice with librbd) can be had neither from the cache
/// nor by download.
pub const VM_SKIP: i32 = 77;

/// The cargo profile the guest gets its binaries from: `SLUICE_PROFILE`, else
/// the test's own (debug under `cargo test`, where `scripts/test.sh` has built
/// them already).
pub fn vm_profile() -> String {
    std::env::var("SLUICE_PROFILE").unwrap_or_else(|_| {
        if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        }
        .to_string()
    })
}

/// A harness run that passed.
pub struct GuestRun {
    pub stdout: String,
    pub stderr: String,
    /// Seconds the script took, booting and host checks included.
    pub secs: f64,
}

/// Runs `script` (relative to the workspace root) with `args` in `dir`
/// (`VM_RUN`; the console log lands in `dir/console.log`), with `VM_TIMEOUT`
/// (600 s unless set) and, where `skip_build`, the binaries already built.
/// `None` when it skipped, which fails under `CI=true` (CI installs all a
/// harness needs); panics, with the console's tail, unless the guest's
/// `SLUICE-VM-RESULT` and the host's `SLUICE-VM-HOST` lines both say PASS.
pub fn run_guest(script: &str, args: &[&str], dir: &TempDir, skip_build: bool) -> Option<GuestRun> {
    let t0 = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join(script))
        .args(args)
        .env("SLUICE_PROFILE", vm_profile())
        .env("VM_RUN", &dir.0)
        .env(
            "VM_TIMEOUT",
            std::env::var("VM_TIMEOUT").unwrap_or_else(|_| "600".into()),
        );
    if skip_build {
        cmd.env("VM_SKIP_BUILD", "1");
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let what = format!("{script} {}", args.join(" "));
    if out.status.code() == Some(VM_SKIP) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what} skipped, but CI installs what it needs:\n{stderr}");
        }
        eprintln!("SKIPPED {what}:\n{stderr}");
        return None;
    }
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    let console_tail = lines[lines.len().saturating_sub(60)..].join("\n");
    if !(out.status.success()
        && stdout.contains("SLUICE-VM-RESULT: PASS")
        && stdout.contains("SLUICE-VM-HOST: PASS"))
    {
        panic!(
            "{what} failed ({:?}):\n{stdout}\n--- stderr\n{stderr}\n--- console (tail)\n{console_tail}",
            out.status
        );
    }
    Some(GuestRun {
        stdout,
        stderr,
        secs: t0.elapsed().as_secs_f64(),
    })
}

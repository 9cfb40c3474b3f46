//! SIGKILL at random points of each block job (stream, intermediate commit,
//! active commit and mirror, before and around their pivots) while an NBD client writes to
//! the device the whole time and logs every write, FUA and flush
//! (`tests/py/nbd_writer.py`). After each kill: every image `qemu-img check`
//! clean (leaks allowed), every acknowledged write readable in the device's
//! view, and a new job on a new daemon finishes the work with the model's
//! content. The phases are in `tests/py/job_kill.py`.
//!
//! Default: two kills per job at spread-out moments; `SLUICE_SOAK=1`: 12.

use sluice_tests::{check, soak, Daemon, TempDir};
use std::time::Duration;

fn phase(d: &Daemon, dir: &str, case: &str) -> String {
    let out = check(
        d.python("job_kill.py", &["--dir", dir, "--case", case]),
        &format!("job_kill.py {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
    out
}

fn kill_rounds(job: &str) {
    // Around the pivot: the phase returns as soon as block-job-complete is
    // sent, without its answer. (Here the pivot takes under a millisecond:
    // these kills land after it, the `active` ones before it.)
    let rounds: Vec<u64> = match (job, soak()) {
        (j, true) if j.ends_with("_complete") => (0..12u64).map(|i| i * 7 % 40).collect(),
        (j, false) if j.ends_with("_complete") => vec![0, 5],
        (_, true) => (0..12u64).map(|i| 40 + i * 311 % 1400).collect(),
        (_, false) => vec![120, 700],
    };
    for (round, wait_ms) in rounds.into_iter().enumerate() {
        let work = TempDir::new(&format!("kill-{job}-{round}"));
        let dir = work.0.to_str().unwrap();
        let d = Daemon::start(&[]);
        phase(&d, dir, &format!("{job}-start"));
        std::thread::sleep(Duration::from_millis(wait_ms));
        d.kill();
        let d = Daemon::start(&[]);
        let out = phase(&d, dir, &format!("{job}-finish"));
        eprintln!("round {round} (kill after {wait_ms} ms): {}", out.trim());
        d.stop();
    }
}

#[test]
fn sigkill_during_a_stream_under_client_writes() {
    kill_rounds("stream");
}

#[test]
fn sigkill_during_an_intermediate_commit_under_client_writes() {
    kill_rounds("commit");
}

#[test]
fn sigkill_during_an_active_commit_under_client_writes() {
    kill_rounds("active");
}

#[test]
fn sigkill_around_an_active_commit_pivot_under_client_writes() {
    kill_rounds("active_complete");
}

#[test]
fn sigkill_during_a_mirror_under_client_writes() {
    kill_rounds("mirror");
}

#[test]
fn sigkill_around_a_mirror_pivot_under_client_writes() {
    kill_rounds("mirror_complete");
}

//! Client I/O during a stream and across a live copy onto a malloc bdev
//! (qemu-io over NBD, every block verified against a model), and a SIGKILL in
//! the middle of a stream (images stay valid, a new stream finishes the job).

use sluice_tests::{check, qemu_img, run, soak, Daemon, TempDir};
use std::time::Duration;

fn scenario(case: &str) {
    let d = Daemon::start_with(&["-m", "0x3"], &[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "stream_clients.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("stream_clients.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn client_writes_and_reads_stay_correct_during_a_stream() {
    scenario("verify");
}

#[test]
fn live_copy_onto_malloc_under_client_io() {
    scenario("live_copy");
}

fn kill_phase(d: &Daemon, dir: &str, phase: &str) {
    let out = check(
        d.python("stream_kill.py", &["--dir", dir, "--case", phase]),
        &format!("stream_kill.py {phase}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn sigkill_during_a_stream_leaves_valid_images_and_a_new_stream_finishes() {
    let work = TempDir::new("kill");
    let dir = work.0.to_str().unwrap();
    // Soak: 40 kills at spread-out moments of the copy.
    let waits: Vec<u64> = if soak() {
        (0..40u64).map(|i| 50 + i * 337 % 950).collect()
    } else {
        vec![150, 400]
    };
    for (round, wait_ms) in waits.into_iter().enumerate() {
        let d = Daemon::start(&[]);
        kill_phase(&d, dir, if round == 0 { "start" } else { "restart" });
        std::thread::sleep(Duration::from_millis(wait_ms));
        d.kill();
        // `qemu-img check`: 0 = clean, 3 = leaked clusters only (allowed after a crash).
        for img in ["top", "mid", "base"] {
            let p = work.join(&format!("{img}.qcow2"));
            let out = run("qemu-img", &["check", p.to_str().unwrap()]);
            let rc = out.status.code().unwrap_or(-1);
            assert!(
                rc == 0 || rc == 3,
                "qemu-img check {img} after SIGKILL: rc {rc}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        qemu_img(&[
            "compare",
            "-F",
            "raw",
            work.join("top.qcow2").to_str().unwrap(),
            work.join("ref.raw").to_str().unwrap(),
        ]);
    }
    let d = Daemon::start(&[]);
    kill_phase(&d, dir, "finish");
}

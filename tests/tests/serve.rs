//! `sluice serve` as a process: start-up on the embedded default, pid file,
//! clean exit on signals, clear errors for bad core masks, idle CPU.

use sluice_tests::{sluice_bin, TempDir};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for(p: &std::path::Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn starts_writes_pid_and_stops_on_sigterm_and_sigint() {
    for sig in ["-TERM", "-INT"] {
        let dir = TempDir::new("serve");
        let mut child = Command::new(sluice_bin())
            .args(["serve", "--no-pin", "--runtime-dir"])
            .arg(&dir.0)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid_file = dir.join("sluice.pid");
        wait_for(&pid_file);
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, child.id());
        let t = Instant::now();
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        let st = child.wait().unwrap();
        assert!(st.success(), "exit status after {sig}: {st}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?} to stop",
            t.elapsed()
        );
        assert!(!pid_file.exists(), "pid file left behind");
    }
}

#[test]
fn bad_core_masks_are_clear_errors() {
    let dir = TempDir::new("badcore");
    for (args, want) in [
        (vec!["-m", "0x100000"], "core 20"),
        (vec!["--cores", "0,0"], "core 0 is given twice"),
        (vec!["-m", "0xzz"], "invalid core mask"),
    ] {
        let out = Command::new(sluice_bin())
            .arg("serve")
            .args(&args)
            .arg("--runtime-dir")
            .arg(&dir.0)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want),
            "{args:?}: stderr does not name the problem: {err}"
        );
    }
}

#[test]
fn idle_daemon_uses_almost_no_cpu() {
    // The default park delay, and parking at once.
    for park in [None, Some("0")] {
        let dir = TempDir::new("idle");
        let mut cmd = Command::new(sluice_bin());
        cmd.args(["serve", "--no-pin", "-m", "0x3", "--runtime-dir"])
            .arg(&dir.0);
        if let Some(us) = park {
            cmd.args(["--park-after-us", us]);
        }
        let mut child = cmd.stderr(Stdio::null()).spawn().unwrap();
        wait_for(&dir.join("sluice.pid"));
        std::thread::sleep(Duration::from_millis(500));
        let t0 = cpu_ticks(child.id());
        std::thread::sleep(Duration::from_secs(3));
        let used = cpu_ticks(child.id()) - t0;
        let _ = child.kill();
        let _ = child.wait();
        // 3 s at 100 ticks/s: 2% of one core would be 6 ticks; spinning reactors would be ~600.
        assert!(
            used <= 6,
            "idle daemon (park after {park:?} us) used {used} ticks of CPU in 3 s"
        );
    }
}

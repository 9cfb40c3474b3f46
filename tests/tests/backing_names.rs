//! The backing file a stream writes into the top image's header, for every
//! kind of node as the stream's base (given by `base` and by `bottom`): what
//! qemu-storage-daemon writes (the file name, or a `json:` pseudo-filename of
//! a node without one, and the node's driver as the format), never a node
//! name. After the daemon stops, qemu-img follows the chain and compares the
//! content; a restarted daemon reopens every top from its header (and refuses,
//! by name, the one whose backing was a RAM disk). tests/py/backing_names.py.

use sluice_tests::{check, qemu_io, Daemon, TempDir};
use std::process::Command;

fn phase(d: Option<&Daemon>, work: &TempDir, phase: &str, extra: &[&str]) {
    let mut args = vec!["--dir", work.0.to_str().unwrap(), "--phase", phase];
    args.extend_from_slice(extra);
    let out = match d {
        Some(d) => d.python("backing_names.py", &args),
        None => Command::new(sluice_tests::python())
            .arg(sluice_tests::workspace_root().join("tests/py/backing_names.py"))
            .args(&args)
            .output()
            .expect("run python"),
    };
    let out = check(out, &format!("backing_names.py --phase {phase}"));
    assert!(out.starts_with("ok"), "{out}");
    eprintln!("backing_names.py --phase {phase}: {}", out.trim_end());
}

/// A loop device over a file holding the base pattern, detached on drop.
struct Loop(String);

impl Loop {
    /// `None` (with the reason printed) where no loop device can be attached.
    fn attach(work: &TempDir) -> Option<Loop> {
        let file = work.join("loop.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        qemu_io(&[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 256k",
            file.to_str().unwrap(),
        ]);
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
            }
            Ok(o) => {
                eprintln!(
                    "SKIP the host_device base: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                // util-linux is installed wherever the tests run in CI.
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "no losetup under CI: {e}"
                );
                eprintln!("SKIP the host_device base: no losetup: {e}");
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn stream_writes_qemus_backing_name_for_every_base_kind() {
    let work = TempDir::new("bnames");
    let lo = Loop::attach(&work);
    let extra: Vec<&str> = match &lo {
        Some(l) => vec!["--loop", l.0.as_str()],
        None => vec![],
    };
    let d = Daemon::start(&[]);
    phase(Some(&d), &work, "stream", &extra);
    assert_eq!(d.stop(), Some(0));
    phase(None, &work, "judge", &extra);
    let d = Daemon::start(&[]);
    phase(Some(&d), &work, "reopen", &extra);
    assert_eq!(d.stop(), Some(0));
}

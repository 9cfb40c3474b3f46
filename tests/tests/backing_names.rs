//! The backing file a stream writes into the top image's header, for every
//! kind of node as the stream's base (given by `base` and by `bottom`): what
//! qemu-storage-daemon writes (the file name, or a `json:` pseudo-filename of
//! a node without one, and the node's driver as the format), never a node
//! name. After the daemon stops, qemu-img follows the chain and compares the
//! content; a restarted daemon reopens every top from its header (and refuses,
//! by name, the one whose backing was a RAM disk). tests/py/backing_names.py.

use sluice_tests::{check, Daemon, TempDir};

fn phase(d: Option<&Daemon>, work: &TempDir, phase: &str) {
    let args = ["--dir", work.0.to_str().unwrap(), "--phase", phase];
    let out = match d {
        Some(d) => d.python("backing_names.py", &args),
        None => std::process::Command::new(sluice_tests::python())
            .arg(sluice_tests::workspace_root().join("tests/py/backing_names.py"))
            .args(args)
            .output()
            .expect("run python"),
    };
    let out = check(out, &format!("backing_names.py --phase {phase}"));
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn stream_writes_qemus_backing_name_for_every_base_kind() {
    let work = TempDir::new("bnames");
    let d = Daemon::start(&[]);
    phase(Some(&d), &work, "stream");
    assert_eq!(d.stop(), Some(0));
    phase(None, &work, "judge");
    let d = Daemon::start(&[]);
    phase(Some(&d), &work, "reopen");
    assert_eq!(d.stop(), Some(0));
}

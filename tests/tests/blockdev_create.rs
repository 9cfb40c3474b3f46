//! `blockdev-create` the qemu-storage-daemon / libvirt way, end to end through
//! `qemu.qmp` (tests/py/blockdev_create.py): an overlay made over QMP alone
//! and snapshotted onto an exported node, judged by qemu-img and qemu-io; the
//! create jobs' events, `query-jobs` output and refusals compared with
//! qemu-storage-daemon 10's answers to the same commands.

use sluice_tests::{check, Daemon, TempDir};

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "blockdev_create.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("blockdev_create.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { scenario(stringify!($name)); } )* };
}

scenarios!(flow, jobs_qsd, errors_qsd);

//! `blockdev-add` / `blockdev-del` the qemu-storage-daemon way, end to end
//! through `qemu.qmp` (tests/py/blockdev.py): nodes opened, exported over NBD,
//! streamed and closed; images judged by qemu-img and qemu-io; every refusal
//! compared with qemu-storage-daemon 10's own answer to the same command.

use sluice_tests::{check, Daemon, TempDir};

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "blockdev.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("blockdev.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { scenario(stringify!($name)); } )* };
}

scenarios!(
    qsd_way,
    backing_forms,
    errors,
    null_raw,
    snapshot_config,
    snapshot_export,
    snapshot_sync_export,
    snapshot_qsd,
);

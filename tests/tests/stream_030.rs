//! QEMU's streaming test scenarios (qemu-iotests 030) end to end: QMP through
//! `qemu.qmp`, images made and judged by qemu-img / qemu-io.

use sluice_tests::{check, Daemon, TempDir};

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "stream_030.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("stream_030.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { scenario(stringify!($name)); } )* };
}

scenarios!(
    stream,
    intermediate,
    pause,
    noop,
    partial,
    backing_file,
    device_not_found,
    job_id_missing,
    read_only,
    parallel,
    overlapping,
    base_node_errors,
    smaller_backing,
    on_error_report,
    on_error_ignore,
    on_error_stop,
    on_error_enospc,
    on_error_enospc_eio,
    cancel_paused,
    set_speed,
    manual_finalize,
);

//! The 2011 streaming API end to end, over QMP (qemu.qmp) and JSON-RPC (SPDK's
//! client): commands, errors, cancel/resume, live block copy, the event.

use sluice_tests::{check, Daemon, TempDir};

#[test]
fn block_stream_2011_api_over_both_sockets() {
    let d = Daemon::start(&[]);
    let work = TempDir::new("s2011");
    let out = check(
        d.python(
            "stream_2011.py",
            &["--dir", work.0.to_str().unwrap(), "--case", "all"],
        ),
        "stream_2011.py",
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

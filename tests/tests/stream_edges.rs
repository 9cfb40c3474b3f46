//! Streaming's rough edges, end to end through `qemu.qmp`
//! (tests/py/stream_edges.py), each compared with qemu-storage-daemon 10
//! answering the same commands: job verbs whose new status a query sees right
//! after the reply, `block-stream`'s arguments and errors, `block_resize`.

use sluice_tests::{check, Daemon, TempDir};

fn scenario(case: &str) {
    let d = Daemon::start(&[]);
    let work = TempDir::new(case);
    let out = check(
        d.python(
            "stream_edges.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("stream_edges.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { scenario(stringify!($name)); } )* };
}

scenarios!(verbs, stream_args, empty_raw_backing);

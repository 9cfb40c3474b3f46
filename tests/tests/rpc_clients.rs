//! The real clients of both worlds against the daemon: SPDK's Python client
//! (library and `spdk-rpc`) and QEMU's (`qemu.qmp`, modern and legacy).

use sluice_tests::{check, Daemon, TempDir};

#[test]
fn spdk_python_client_creates_lists_and_deletes_bdevs() {
    let d = Daemon::start(&[]);
    let work = TempDir::new("spdkpy");
    let work_s = work.0.to_str().unwrap();
    let out = check(
        d.python("rpc_spdk_client.py", &["--workdir", work_s]),
        "rpc_spdk_client.py",
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[test]
fn qemu_qmp_clients_negotiate_run_commands_and_get_events() {
    let d = Daemon::start(&[]);
    let out = check(d.python("qmp_clients.py", &[]), "qmp_clients.py");
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

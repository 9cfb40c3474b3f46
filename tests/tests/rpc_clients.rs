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

#[test]
fn spdk_rpc_over_tcp() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let _d = Daemon::start(&["--rpc-listen", &listen]);
    let spdk_rpc = sluice_tests::workspace_root().join(".venv/bin/spdk-rpc");
    let port_s = port.to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(&spdk_rpc)
            .args(["-s", "127.0.0.1", "-p", &port_s])
            .args(args)
            .output()
            .expect("run spdk-rpc")
    };
    let out = check(
        run(&["bdev_null_create", "T0", "1", "512"]),
        "spdk-rpc over TCP",
    );
    assert_eq!(out.trim(), "T0");
    let out = check(run(&["bdev_get_bdevs", "-b", "T0"]), "spdk-rpc over TCP");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["num_blocks"], 2048);
}

//! The NBD export with real clients: qemu-io, qemu-img, nbdinfo, fio; many
//! clients at once; TCP; export and server life cycle over RPC; `--export`.

mod nbd_common;

use nbd_common::*;
use serde_json::{json, Value};
use sluice_tests::{check, qemu_img, qemu_io, run, Daemon, TempDir};
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

#[test]
fn qemu_io_patterns_and_unaligned_writes() {
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("m0", 32);
    n.export("m0", true);
    let uri = n.uri("m0");
    let out = qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -P 0x22 1M 4k",
        "-c",
        "write -P 0x33 5000 300",
        "-c",
        "write -z 2M 1M",
        "-c",
        "write -f -P 0x44 3M 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0x11 0 4096",
        "-c",
        "read -P 0x11 8192 1040384",
        "-c",
        "read -P 0x22 1M 4k",
        "-c",
        "read -P 0x33 5000 300",
        "-c",
        "read -P 0x11 4096 904",
        "-c",
        "read -P 0 2M 1M",
        "-c",
        "read -P 0x44 3M 64k",
        &uri,
    ]);
    assert!(
        out.contains("read 65536/65536 bytes at offset 3145728"),
        "{out}"
    );
    // A fresh connection sees the same data.
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "read -P 0x33 5000 300",
        "-c",
        "read -P 0x22 1M 4k",
        &uri,
    ]);
    // A read-only export refuses writes with EPERM.
    n.malloc("ro", 4);
    n.export("ro", false);
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &n.uri("ro")],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open it writable (the server's
    // own EPERM is checked byte by byte in nbd_protocol.rs).
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Permission denied") || text.contains("Operation not permitted"),
        "{text}"
    );
    qemu_io(&["-f", "raw", "-r", "-c", "read -P 0 0 4k", &n.uri("ro")]);
}

#[test]
fn qemu_img_compare_against_a_file() {
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("m0", 16);
    n.export("m0", true);
    let tmp = TempDir::new("cmp");
    let file = tmp.join("src.raw");
    let f = file.to_str().unwrap();
    qemu_img(&["create", "-f", "raw", f, "16M"]);
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x71 0 3M",
        "-c",
        "write -P 0x72 7M 512k",
        "-c",
        "write -P 0x73 15M 1M",
        f,
    ]);
    let uri = n.uri("m0");
    qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", f, &uri]);
    let out = qemu_img(&["compare", "-f", "raw", "-F", "raw", f, &uri]);
    assert!(out.contains("Images are identical"), "{out}");
    // One changed sector is found.
    qemu_io(&["-f", "raw", "-c", "write -P 0x99 9M 512", &uri]);
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", f, &uri]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mismatch at offset 9437184"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn nbdinfo_list_and_map() {
    if !have("nbdinfo") {
        eprintln!("nbdinfo missing (apt-get install libnbd-bin); skipping");
        return;
    }
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("a", 4);
    n.malloc("b", 8);
    n.d.call("block-export-add", json!({"type": "nbd", "id": "ea", "node-name": "a", "name": "alpha", "description": "first disk"}));
    n.d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "eb", "device": "b", "writable": true}),
    );
    let list = check(
        run(
            "nbdinfo",
            &[
                "--list",
                &format!("nbd+unix:///?socket={}", n.sock.display()),
            ],
        ),
        "nbdinfo --list",
    );
    assert!(list.contains("export=\"alpha\""), "{list}");
    assert!(list.contains("first disk"), "{list}");
    assert!(list.contains("export=\"b\""), "{list}");
    assert!(list.contains("export-size: 8388608"), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    let map = check(run("nbdinfo", &["--map", &n.uri("b")]), "nbdinfo --map");
    let row: Vec<&str> = map
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(row[..4], ["0", "8388608", "0", "data"], "{map}");
    let j = qemu_img(&["map", "--output=json", "-f", "raw", &n.uri("alpha")]);
    let v: Value = serde_json::from_str(&j).expect("json");
    assert_eq!(v[0]["data"], true, "{j}");
    assert_eq!(v[0]["length"], 4 << 20, "{j}");
}

#[test]
fn fio_nbd_engine_with_verify() {
    if !have("fio") {
        eprintln!("fio missing; skipping");
        return;
    }
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("m0", 64);
    n.export("m0", true);
    let uri = format!("--uri={}", n.uri("m0"));
    for rw in ["randwrite", "write"] {
        let out = run(
            "fio",
            &[
                "--name=v",
                "--ioengine=nbd",
                &uri,
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=32",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_state_save=0",
                "--verify_fatal=1",
            ],
        );
        let so = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "fio {rw}: {so}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(so.contains("err= 0"), "{so}");
        assert!(!so.contains("verify: bad"), "{so}");
    }
}

/// Starts qemu-io with `args`, its output captured.
fn spawn_qemu_io(args: &[&str]) -> std::process::Child {
    Command::new("qemu-io")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qemu-io")
}

/// Waits for each qemu-io and asserts it succeeded without a failed pattern check.
fn wait_verified(children: Vec<std::process::Child>, what: &str) {
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().expect("wait");
        let so = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && !so.contains("verification failed"),
            "{what} {i}: {so}"
        );
    }
}

#[test]
fn thirty_two_clients_at_once_on_two_reactors() {
    let mut n = NbdDaemon::start(&["-m", "0x3"], &[]);
    n.malloc("m0", 64);
    n.export("m0", true);
    let uri = n.uri("m0");
    // 32 clients connected and doing I/O at the same time, each on its own MiB.
    let writers: Vec<_> = (0..32u64)
        .map(|i| {
            let off = i << 20;
            let p = 0x40 + i;
            spawn_qemu_io(&[
                "-f",
                "raw",
                "-c",
                &format!("write -P {p} {off} 1M"),
                "-c",
                &format!("read -P {p} {off} 1M"),
                "-c",
                &format!("write -P {} {} 64k", p + 1, off + 4096),
                "-c",
                &format!("read -P {} {} 64k", p + 1, off + 4096),
                &uri,
            ])
        })
        .collect();
    wait_verified(writers, "client");
    let children: Vec<_> = (0..32u64)
        .map(|i| {
            spawn_qemu_io(&[
                "-f",
                "raw",
                "-r",
                "-c",
                &format!("read -P {} {} 4096", 0x40 + i, i << 20),
                "-c",
                &format!("read -P {} {} 64k", 0x41 + i, (i << 20) + 4096),
                &uri,
            ])
        })
        .collect();
    wait_verified(children, "reader");
    // 32 idle connections held open: no thread per connection.
    let held: Vec<_> = (0..32)
        .map(|_| Raw::attach(&n.sock, "m0", false, false).0)
        .collect();
    let threads = std::fs::read_dir(format!("/proc/{}/task", n.d.pid()))
        .expect("proc")
        .count();
    assert!(threads < 32, "{threads} threads for 32 connections");
    for (i, mut c) in held.into_iter().enumerate() {
        let d = c.read_simple(i as u64, (i as u64) << 20, 4096);
        assert!(d.iter().all(|&b| b == 0x40 + i as u8));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn server_and_export_life_cycle_over_rpc_and_tcp() {
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_malloc_create",
        json!({"name": "m0", "num_blocks": 8192, "block_size": 512}),
    );
    let e = d.call_err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m0"}),
    );
    assert!(
        e["message"].as_str().unwrap_or("").contains("not running"),
        "{e}"
    );
    let e = d.call_err(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "0.0.0.0", "port": "10809"}}),
    );
    assert!(
        e["message"].as_str().unwrap_or("").contains("loopback"),
        "{e}"
    );
    let port = free_port();
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}}),
    );
    let e = d.call_err(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("already running"),
        "{e}"
    );
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m0", "name": "disk", "writable": true}),
    );
    let e = d.call_err(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m0", "name": "other"}),
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("already in use"),
        "{e}"
    );
    let e = d.call_err(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "nosuch"}),
    );
    assert!(
        e["message"].as_str().unwrap_or("").contains("nosuch"),
        "{e}"
    );
    let e = d.call_err("bdev_malloc_delete", json!({"name": "m0"}));
    assert!(
        e.to_string().contains("in use") || e.to_string().contains("claim"),
        "exported bdev is claimed: {e}"
    );
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x61 0 64k",
        "-c",
        "read -P 0x61 0 64k",
        &uri,
    ]);
    let q = d.call("query-block-exports", Value::Null);
    assert_eq!(
        q,
        json!([{"type": "nbd", "id": "e0", "node-name": "m0", "shutting-down": false}])
    );

    // A connected client blocks a safe delete; a hard one disconnects it.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok();
    let mut c_raw = attach_tcp(&mut c, "disk");
    let e = d.call_err("block-export-del", json!({"id": "e0"}));
    assert!(
        e["message"].as_str().unwrap_or("").contains("still in use"),
        "{e}"
    );
    d.call("block-export-del", json!({"id": "e0", "mode": "hard"}));
    assert!(c_raw(), "hard delete closes the client's connection");
    for _ in 0..250 {
        if d.call("query-block-exports", Value::Null) == json!([]) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(d.call("query-block-exports", Value::Null), json!([]));
    d.call("bdev_malloc_delete", json!({"name": "m0"}));
    let e = d.call_err("block-export-del", json!({"id": "e0"}));
    assert!(
        e["message"].as_str().unwrap_or("").contains("not found"),
        "{e}"
    );

    d.call("nbd-server-stop", Value::Null);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener closed"
    );
    let e = d.call_err("nbd-server-stop", Value::Null);
    assert!(
        e["message"].as_str().unwrap_or("").contains("not running"),
        "{e}"
    );
    // Restart on a Unix socket.
    let sock = d.dir.join("again.sock");
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": sock.to_str().unwrap()}}),
    );
    d.call(
        "bdev_malloc_create",
        json!({"name": "m1", "num_blocks": 2048, "block_size": 512}),
    );
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "m1"}),
    );
    qemu_io(&[
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0 0 4k",
        &format!("nbd+unix:///m1?socket={}", sock.display()),
    ]);
    assert_eq!(d.stop(), Some(0));
    assert!(!sock.exists(), "socket removed at shutdown");
}

/// Negotiates an export over TCP; returns a closure telling whether the server
/// closed the connection.
fn attach_tcp<'a>(c: &'a mut std::net::TcpStream, name: &str) -> impl FnMut() -> bool + 'a {
    use std::io::{Read, Write};
    let mut g = [0u8; 18];
    c.read_exact(&mut g).expect("greeting");
    c.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    let data = Raw::go_data(name, &[]);
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(&data);
    c.write_all(&o).expect("GO");
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).expect("reply");
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).expect("reply data");
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_INFO);
    }
    move || {
        let mut b = [0u8; 1];
        matches!(c.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn exports_from_the_command_line() {
    let tmp = TempDir::new("cfg");
    let cfg = tmp.join("config.json");
    std::fs::write(
        &cfg,
        json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "boot0", "num_blocks": 4096, "block_size": 512}},
            {"method": "bdev_malloc_create", "params": {"name": "boot1", "num_blocks": 4096, "block_size": 4096}}
        ]}]})
        .to_string(),
    )
    .expect("config");
    let mut n = NbdDaemon::start(
        &["-m", "0x1"],
        &[
            "--json",
            cfg.to_str().unwrap(),
            "--export",
            "boot0:writable",
            "--export",
            "boot1:writable",
        ],
    );
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x1f 0 64k",
        "-c",
        "read -P 0x1f 0 64k",
        &n.uri("boot0"),
    ]);
    // 4 KiB blocks: qemu honours the advertised minimum block size and does a
    // read-modify-write for a 512-byte write.
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 2 512 512",
        "-c",
        "read -P 0 0 512",
        "-c",
        "read -P 2 512 512",
        "-c",
        "read -P 0 1024 3072",
        &n.uri("boot1"),
    ]);
    let q = n.d.call("query-block-exports", Value::Null);
    assert_eq!(q.as_array().map(|a| a.len()), Some(2), "{q}");
    // SIGTERM with a client connected: clean exit.
    let (_c, _, _) = Raw::attach(&n.sock, "boot0", true, false);
    let t0 = std::time::Instant::now();
    assert_eq!(n.d.stop(), Some(0));
    assert!(t0.elapsed().as_secs() < 10);

    // --export without --nbd-listen is refused.
    let out = Command::new(sluice_tests::sluice_bin())
        .args([
            "serve",
            "--runtime-dir",
            tmp.join("x").to_str().unwrap(),
            "-m",
            "0x1",
            "--no-pin",
            "--export",
            "boot0",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nbd-listen"));
}

//! A reactor never blocks on an open: a path that names a FIFO (or a character
//! device) is refused at once with an error naming it, whether it is a qcow2
//! overlay's backing file, the image itself, a leaf's file or an image to
//! create, and every other device keeps serving meanwhile.

mod nbd_common;

use nbd_common::*;
use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, Daemon, TempDir};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Calls `method` on a thread of its own; the reply, or a panic naming the
/// call if none comes within 10 s (the daemon blocked).
fn call_within(d: &Daemon, method: &str, params: Value) -> Value {
    let sock = d.rpc_sock.clone();
    let (tx, rx) = mpsc::channel();
    let m = method.to_string();
    let p = params.clone();
    std::thread::spawn(move || {
        let _ = tx.send(raw_call(&sock, &m, p));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{method} {params} did not answer within 10 s"))
}

/// One JSON-RPC call on a fresh connection.
fn raw_call(sock: &Path, method: &str, params: Value) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes()).expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

/// The error of a reply that must be one, naming `path` and `kind`.
fn expect_refused(reply: &Value, path: &Path, kind: &str) {
    let e = reply
        .get("error")
        .unwrap_or_else(|| panic!("expected an error naming {}: {reply}", path.display()));
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(path.to_str().unwrap()) && msg.contains(kind),
        "the error should name {} as {kind:?}: {e}",
        path.display()
    );
}

fn mkfifo(p: &Path) {
    let out = Command::new("mkfifo").arg(p).output().expect("mkfifo");
    assert!(out.status.success(), "mkfifo {}", p.display());
}

#[test]
fn a_fifo_backing_file_is_refused_at_once_and_exports_keep_serving() {
    let work = TempDir::new("fifo");
    let fifo = work.join("fifo");
    mkfifo(&fifo);
    let ov = work.join("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        fifo.to_str().unwrap(),
        "-F",
        "raw",
        ov.to_str().unwrap(),
        "16M",
    ]);
    // The same with no format in the header (its extension's type changed to
    // one readers skip): sluice probes the backing file.
    let ov_probe = work.join("ov-probe.qcow2");
    std::fs::copy(&ov, &ov_probe).unwrap();
    let mut bytes = std::fs::read(&ov_probe).unwrap();
    let ext = 0xe279_2acau32.to_be_bytes();
    let at = (104..4096)
        .step_by(4)
        .find(|&i| bytes[i..i + 4] == ext)
        .expect("a backing format extension");
    bytes[at..at + 4].copy_from_slice(&0x7fff_0001u32.to_be_bytes());
    std::fs::write(&ov_probe, &bytes).unwrap();
    let info = qemu_img(&["info", "--output=json", ov_probe.to_str().unwrap()]);
    assert!(!info.contains("backing-filename-format"), "{info}");
    // One reactor: a blocked open would stop every export.
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("m0", 4);
    n.export("m0", true);
    let uri = n.uri("m0");
    qemu_io(&["-f", "raw", "-c", "write -P 0x5a 0 64k", &uri]);

    for img in [&ov, &ov_probe] {
        let sock = n.d.rpc_sock.clone();
        let params = json!({"name": "ov", "filename": img.to_str().unwrap()});
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(raw_call(&sock, "bdev_qcow2_open", params));
        });
        // The export serves while (and after) the open is handled.
        let t0 = Instant::now();
        let out = Command::new("timeout")
            .args([
                "10",
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 0 64k",
                &uri,
            ])
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            "the NBD export stopped serving: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let reply = rx
            .recv_timeout(Duration::from_secs(10).saturating_sub(t0.elapsed()))
            .unwrap_or_else(|_| panic!("bdev_qcow2_open of {} blocked", img.display()));
        expect_refused(&reply, &fifo, "FIFO");
    }
    // Nothing was left registered.
    let names: Vec<Value> =
        n.d.call("bdev_get_bdevs", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].clone())
            .collect();
    assert_eq!(names, [json!("m0")]);

    // The image itself a FIFO; an image to create over a FIFO; leaves.
    let r = call_within(
        &n.d,
        "bdev_qcow2_open",
        json!({"name": "f", "filename": fifo.to_str().unwrap()}),
    );
    expect_refused(&r, &fifo, "FIFO");
    let r = call_within(
        &n.d,
        "bdev_qcow2_create",
        json!({"name": "c", "filename": fifo.to_str().unwrap(), "size": 1 << 20}),
    );
    expect_refused(&r, &fifo, "FIFO");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo(),
        "the FIFO was replaced"
    );
    for m in ["bdev_uring_create", "bdev_aio_create"] {
        let r = call_within(
            &n.d,
            m,
            json!({"name": "leaf", "filename": fifo.to_str().unwrap()}),
        );
        expect_refused(&r, &fifo, "FIFO");
    }
    let r = call_within(
        &n.d,
        "blockdev-add",
        json!({"driver": "file", "node-name": "leaf", "filename": fifo.to_str().unwrap()}),
    );
    expect_refused(&r, &fifo, "FIFO");
    let chr = PathBuf::from("/dev/null");
    let r = call_within(
        &n.d,
        "bdev_uring_create",
        json!({"name": "leaf", "filename": "/dev/null"}),
    );
    expect_refused(&r, &chr, "character device");

    // SIGTERM stops the service promptly.
    let t0 = Instant::now();
    assert_eq!(n.d.stop(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t0.elapsed()
    );
}

//! The JSON-RPC server on the wire: framing without delimiters, batches,
//! notifications, SPDK's error codes, limits, and the socket's life cycle.

use serde_json::{json, Value};
use sluice_tests::{sluice_bin, Daemon, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn open(d: &Daemon) -> Conn {
        let s = UnixStream::connect(&d.rpc_sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("send");
    }
    /// One reply line (replies end with a newline).
    fn reply(&mut self) -> Value {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read reply");
        assert!(n > 0, "connection closed instead of replying");
        assert!(
            line.ends_with('\n'),
            "reply does not end with a newline: {line:?}"
        );
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }
    fn call(&mut self, req: Value) -> Value {
        self.send(req.to_string().as_bytes());
        self.reply()
    }
    /// Whether the server closed the connection (EOF within a second).
    fn closed(&mut self) -> bool {
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0))
    }
}

fn code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error reply: {reply}"))
}

#[test]
fn pretty_printed_requests_without_newline_several_per_connection() {
    let d = Daemon::start(&[]);
    let mut c = Conn::open(&d);
    // SPDK's client: indent=2, no trailing newline, the next request right after.
    let r1 = serde_json::to_string_pretty(
        &json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1}),
    )
    .unwrap();
    let r2 = serde_json::to_string_pretty(
        &json!({"jsonrpc": "2.0", "method": "rpc_get_methods", "id": "two"}),
    )
    .unwrap();
    c.send(format!("{r1}{r2}").as_bytes());
    let a = c.reply();
    assert_eq!(a["id"], 1);
    assert_eq!(a["jsonrpc"], "2.0");
    assert!(
        a["result"]["version"]
            .as_str()
            .unwrap()
            .starts_with("sluice v"),
        "{a}"
    );
    let b = c.reply();
    assert_eq!(b["id"], "two");
    assert!(
        b["result"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "bdev_malloc_create"),
        "{b}"
    );

    // Byte by byte, with a string holding braces and escaped quotes.
    let req = json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "params": {"name": "a}{\"b"}, "id": 3}).to_string();
    for b in req.as_bytes() {
        c.send(&[*b]);
    }
    let r = c.reply();
    assert_eq!(r["id"], 3);
    assert_eq!(code(&r), -19, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("a}{\\\"b")
            || r["error"]["message"].as_str().unwrap().contains("a}{"),
        "{r}"
    );
}

#[test]
fn batches_and_notifications() {
    let d = Daemon::start(&[]);
    let mut c = Conn::open(&d);
    let r = c.call(json!([
        {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 128, "block_size": 512}, "id": 1},
        {"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": "N1", "num_blocks": 128, "block_size": 512}},
        {"jsonrpc": "2.0", "method": "no_such_method", "id": 2},
        42,
        {"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 3}
    ]));
    let arr = r
        .as_array()
        .unwrap_or_else(|| panic!("batch reply is not an array: {r}"));
    assert_eq!(arr.len(), 4, "the notification gets no reply: {r}");
    assert_eq!(arr[0]["result"], "N0");
    assert_eq!(code(&arr[1]), -32601);
    assert_eq!(arr[1]["id"], 2);
    assert_eq!(code(&arr[2]), -32600);
    assert_eq!(arr[2]["id"], Value::Null);
    let names: Vec<&str> = arr[3]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["N0", "N1"], "the notification in the batch ran");

    // A lone notification: no reply; the next request's reply comes first.
    c.send(
        json!({"jsonrpc": "2.0", "method": "bdev_null_delete", "params": {"name": "N1"}})
            .to_string()
            .as_bytes(),
    );
    let r = c.call(json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 9}));
    assert_eq!(r["id"], 9);
    assert_eq!(r["result"].as_array().unwrap().len(), 1);
    // A batch of notifications only: nothing at all.
    c.send(
        json!([{"jsonrpc": "2.0", "method": "bdev_null_delete", "params": {"name": "N0"}}])
            .to_string()
            .as_bytes(),
    );
    let r = c.call(json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 10}));
    assert_eq!(r["id"], 10);
    assert_eq!(r["result"], json!([]));
    // An empty batch is an invalid request.
    let r = c.call(json!([]));
    assert_eq!(code(&r), -32600);
}

#[test]
fn spdk_error_codes() {
    let mut d = Daemon::start(&[]);
    let mut c = Conn::open(&d);
    let r = c.call(json!({"jsonrpc": "2.0", "method": "nope", "id": 1}));
    assert_eq!(code(&r), -32601);
    assert_eq!(r["id"], 1);
    for (bad, why) in [
        (json!({"method": "spdk_get_version", "id": 1}), "no jsonrpc"),
        (
            json!({"jsonrpc": "1.0", "method": "spdk_get_version", "id": 1}),
            "wrong version",
        ),
        (json!({"jsonrpc": "2.0", "id": 1}), "no method"),
        (
            json!({"jsonrpc": "2.0", "method": 7, "id": 1}),
            "method not a string",
        ),
        (
            json!({"jsonrpc": "2.0", "method": "spdk_get_version", "params": 3, "id": 1}),
            "params not structured",
        ),
        (
            json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1, "extra": true}),
            "unknown member",
        ),
        (
            json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": {"a": 1}}),
            "id an object",
        ),
    ] {
        let r = c.call(bad);
        assert_eq!(code(&r), -32600, "{why}: {r}");
    }
    // Wrongly typed, unknown and missing parameters name the parameter.
    let e = d.call_err(
        "bdev_malloc_create",
        json!({"num_blocks": "many", "block_size": 512}),
    );
    assert_eq!(e["code"], -32602);
    assert!(e["message"].as_str().unwrap().contains("num_blocks"), "{e}");
    let e = d.call_err(
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "colour": "red"}),
    );
    assert_eq!(e["code"], -32602);
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");
    let e = d.call_err(
        "bdev_null_create",
        json!({"num_blocks": 8, "block_size": 512}),
    );
    assert_eq!(e["code"], -32602);
    assert!(e["message"].as_str().unwrap().contains("name"), "{e}");
    let e = d.call_err("bdev_malloc_create", json!([8, 512]));
    assert_eq!(e["code"], -32602);
    // Negative errnos where SPDK uses them.
    d.call(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 16, "block_size": 512}),
    );
    let e = d.call_err(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 16, "block_size": 512}),
    );
    assert_eq!(e["code"], -17, "{e}");
    let e = d.call_err("bdev_malloc_delete", json!({"name": "M9"}));
    assert_eq!(e["code"], -19, "{e}");
    let e = d.call_err("bdev_get_bdevs", json!({"name": "M9"}));
    assert_eq!(e["code"], -19, "{e}");
    assert_eq!(
        d.call("bdev_error_create", json!({"base_name": "M0"})),
        true
    );
    let e = d.call_err("bdev_malloc_delete", json!({"name": "M0"}));
    assert_eq!(e["code"], -16, "a claimed bdev is busy: {e}");
}

#[test]
fn malformed_truncated_and_oversized_requests_then_service_continues() {
    let d = Daemon::start(&["--rpc-max-request-size", "4096"]);
    // JSON that can never become valid: -32700 at the bad byte, then the
    // connection closes (as SPDK's jsonrpc_server does).
    let mut c = Conn::open(&d);
    c.send(b"{\"jsonrpc\": \"2.0\", \"method\": , \"id\": 1");
    let r = c.reply();
    assert_eq!(code(&r), -32700, "{r}");
    assert_eq!(r["id"], Value::Null);
    assert!(c.closed(), "connection stays open after a hopeless request");
    // Grammatical and balanced but still not JSON (a lone surrogate): -32700,
    // and the same connection keeps working.
    let mut c = Conn::open(&d);
    c.send(b"{\"jsonrpc\": \"2.0\", \"method\": \"\\ud800\", \"id\": 1}");
    let r = c.reply();
    assert_eq!(code(&r), -32700, "{r}");
    assert_eq!(r["id"], Value::Null);
    let r = c.call(json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 2}));
    assert_eq!(r["id"], 2);

    // Oversized: -32600 as soon as the limit is crossed; the rest is skipped and
    // the connection keeps working.
    let big = "x".repeat(20_000);
    c.send(format!("{{\"jsonrpc\": \"2.0\", \"method\": \"spdk_get_version\", \"params\": {{\"pad\": \"{big}\"}}, \"id\": 3}}").as_bytes());
    let r = c.reply();
    assert_eq!(code(&r), -32600, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("4096"),
        "{r}"
    );
    let r = c.call(json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 4}));
    assert_eq!(
        r["id"], 4,
        "connection still serves after an oversized request"
    );

    // Bytes that cannot start a request: -32700 and the connection is closed
    // (no resynchronisation point, as in SPDK).
    let mut g = Conn::open(&d);
    g.send(b"hello\n");
    assert_eq!(code(&g.reply()), -32700);
    assert!(g.closed(), "connection stays open after garbage");

    // Truncated request, then the client goes away.
    let mut t = Conn::open(&d);
    t.send(b"{\"jsonrpc\": \"2.0\", \"method\": \"spdk_get_ver");
    drop(t);

    // A client that never finishes its request stalls nobody.
    let mut slow = Conn::open(&d);
    slow.send(b"{\"jsonrpc\": \"2.0\", ");
    let mut other = Conn::open(&d);
    let t0 = Instant::now();
    let r = other.call(json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 5}));
    assert_eq!(r["id"], 5);
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The slow one can still finish.
    slow.send(b"\"method\": \"spdk_get_version\", \"id\": 6}");
    assert_eq!(slow.reply()["id"], 6);
}

#[test]
fn sixty_four_concurrent_clients() {
    let d = Daemon::start_with(&["-m", "0x3"], &[]);
    let sock = d.rpc_sock.clone();
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let name = format!("C{i}");
                let req = json!({"jsonrpc": "2.0", "method": "bdev_null_create", "id": i,
                                 "params": {"name": name, "num_blocks": 64, "block_size": 512}});
                w.write_all(req.to_string().as_bytes()).unwrap();
                for k in 0..20 {
                    let req = json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": k, "params": {"name": name}});
                    w.write_all(req.to_string().as_bytes()).unwrap();
                }
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["result"], json!(name), "{v}");
                for k in 0..20 {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    let v: Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(v["id"], k);
                    assert_eq!(v["result"][0]["name"], json!(name));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let mut d = d;
    assert_eq!(
        d.call("bdev_get_bdevs", Value::Null)
            .as_array()
            .unwrap()
            .len(),
        64
    );
}

/// A connection that the server admitted (answered a call on).
fn admitted(d: &Daemon) -> Conn {
    let t0 = Instant::now();
    loop {
        let s = UnixStream::connect(&d.rpc_sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 0});
        let _ = (&s).write_all(req.to_string().as_bytes());
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v.get("result").is_some() {
            return Conn { w: s, r };
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "never admitted: {line:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connection_cap_refuses_with_a_clear_error() {
    let d = Daemon::start(&["--rpc-max-connections", "4"]);
    // The harness's readiness probe may still count for a moment: retry until
    // each of the four is admitted.
    let mut held: Vec<Conn> = (0..4).map(|_| admitted(&d)).collect();
    for c in held.iter_mut() {
        let r = c.call(json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1}));
        assert_eq!(r["id"], 1);
    }
    let mut extra = Conn::open(&d);
    let r = extra.reply();
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many connections"),
        "{r}"
    );
    assert!(extra.closed());
    held.pop();
    // The freed slot is usable again once the server notices the close.
    drop(admitted(&d));
}

#[test]
fn socket_mode_stale_socket_and_live_daemon() {
    let d = Daemon::start(&[]);
    for s in [&d.rpc_sock, &d.qmp_sock] {
        let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", s.display());
    }
    // A second daemon on the same sockets is refused clearly, and the first keeps serving.
    let dir2 = TempDir::new("live");
    let out = Command::new(sluice_bin())
        .args(["serve", "--no-pin", "-m", "0x1", "--runtime-dir"])
        .arg(&dir2.0)
        .arg("-r")
        .arg(&d.rpc_sock)
        .arg("--qmp-socket")
        .arg(dir2.join("q.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "unclear error: {err}");
    let mut c = Conn::open(&d);
    assert_eq!(
        c.call(json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1}))["id"],
        1
    );
    d.stop();

    // A stale socket (nobody listening) is replaced.
    let dir = TempDir::new("stale");
    let stale = dir.join("sluice.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut child = Command::new(sluice_bin())
        .args(["serve", "--no-pin", "-m", "0x1", "--runtime-dir"])
        .arg(&dir.0)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let s = loop {
        if let Ok(s) = UnixStream::connect(&stale) {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "stale socket not replaced"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(s);
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!stale.exists(), "socket file left behind at stop");
    assert!(
        !dir.join("sluice-qmp.sock").exists(),
        "QMP socket file left behind at stop"
    );
}

#[test]
fn tcp_listener_loopback_only_unless_allowed() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&["--rpc-listen", &addr]);
    let s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(
        json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], 1);
    let out = d.cli_tcp(&addr);
    assert!(out.contains("sluice v"), "{out}");
    drop(d);

    let dir = TempDir::new("tcp");
    let out = Command::new(sluice_bin())
        .args([
            "serve",
            "--no-pin",
            "-m",
            "0x1",
            "--rpc-listen",
            "0.0.0.0:0",
            "--runtime-dir",
        ])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a wildcard address was accepted without --rpc-allow-remote"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--rpc-allow-remote"), "{err}");
    assert!(
        !dir.join("sluice.sock").exists(),
        "the Unix socket was left behind after the failed start"
    );
}

trait CliTcp {
    fn cli_tcp(&self, addr: &str) -> String;
}

impl CliTcp for Daemon {
    fn cli_tcp(&self, addr: &str) -> String {
        let out = Command::new(sluice_bin())
            .args(["rpc", "-s", addr, "spdk_get_version"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

#[test]
fn a_live_foreign_server_on_the_path_is_refused_and_kept() {
    let dir = TempDir::new("foreign");
    let path = dir.join("busy.sock");
    let _live = UnixListener::bind(&path).unwrap();
    let out = Command::new(sluice_bin())
        .args(["serve", "--no-pin", "-m", "0x1", "--runtime-dir"])
        .arg(&dir.0)
        .arg("-r")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a live server accepts connections on it"),
        "{err}"
    );
    assert!(path.exists(), "the live server's socket was removed");
    UnixStream::connect(&path).expect("the live server is still reachable");
}

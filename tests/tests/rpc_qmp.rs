//! The QMP server on the wire: greeting, negotiation, commands, errors, ids,
//! CRLF line ends, pushed events; and `notify_get_notifications` on JSON-RPC.

use serde_json::{json, Value};
use sluice_tests::Daemon;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects and reads the greeting.
    fn open(d: &Daemon) -> (Qmp, Value) {
        let s = UnixStream::connect(&d.qmp_sock).expect("connect qmp");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut q = Qmp {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        let g = q.line();
        (q, g)
    }
    /// Connects and negotiates.
    fn negotiated(d: &Daemon) -> Qmp {
        let (mut q, _) = Qmp::open(d);
        assert_eq!(
            q.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        q
    }
    fn line(&mut self) -> Value {
        let mut l = String::new();
        assert!(
            self.r.read_line(&mut l).expect("read") > 0,
            "QMP connection closed"
        );
        assert!(l.ends_with("\r\n"), "line does not end with CRLF: {l:?}");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
    }
    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }
    fn cmd(&mut self, c: Value) -> Value {
        self.send(c.to_string().as_bytes());
        self.line()
    }
    /// Every line that arrives until the connection is quiet for `quiet`.
    fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        self.r.get_ref().set_read_timeout(Some(quiet)).unwrap();
        let mut got = Vec::new();
        loop {
            let mut l = String::new();
            match self.r.read_line(&mut l) {
                Ok(n) if n > 0 => got.push(serde_json::from_str(&l).unwrap()),
                _ => break,
            }
        }
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        got
    }
}

fn class(v: &Value) -> &str {
    v["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

#[test]
fn greeting_negotiation_commands_and_errors() {
    let mut d = Daemon::start(&[]);
    let (mut q, g) = Qmp::open(&d);
    assert!(g["QMP"]["version"]["qemu"]["major"].is_u64(), "{g}");
    assert!(
        g["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("sluice"),
        "{g}"
    );
    assert_eq!(g["QMP"]["capabilities"], json!([]));

    // Anything before negotiation: CommandNotFound, id echoed.
    let r = q.cmd(json!({"execute": "query-version", "id": "early"}));
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(r["id"], "early");
    // Bad negotiation arguments are refused and negotiation is still pending.
    let r = q.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}));
    assert_eq!(class(&r), "GenericError");
    assert!(r["error"]["desc"].as_str().unwrap().contains("oob"), "{r}");
    let r = q.cmd(json!({"execute": "qmp_capabilities", "arguments": {"bogus": 1}}));
    assert_eq!(class(&r), "GenericError");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("bogus"),
        "{r}"
    );
    let r = q.cmd(json!({"execute": "bdev_get_bdevs"}));
    assert_eq!(class(&r), "CommandNotFound");

    let r = q.cmd(json!({"execute": "qmp_capabilities", "id": 1}));
    assert_eq!(r, json!({"return": {}, "id": 1}));
    let r = q.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(class(&r), "CommandNotFound", "a second negotiation: {r}");

    // Ids of any JSON type come back verbatim.
    for id in [
        json!({"a": [1, "x", null]}),
        json!("s"),
        json!(3.5),
        json!([]),
    ] {
        let r = q.cmd(json!({"execute": "query-version", "id": id}));
        assert_eq!(r["id"], id);
        assert_eq!(r["return"]["qemu"]["major"], 10);
    }
    let r = q.cmd(json!({"execute": "query-commands"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "quit",
        "bdev_get_bdevs",
    ] {
        assert!(names.contains(&n), "{n} missing from query-commands");
    }

    let r = q.cmd(json!({"execute": "no-such-command", "id": 2}));
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(r["id"], 2);
    // Unknown arguments are rejected before anything happens.
    let r = q.cmd(json!({"execute": "bdev_null_create", "arguments": {"name": "X", "num_blocks": 8, "block_size": 512, "extra": 1}}));
    assert_eq!(class(&r), "GenericError");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("extra"),
        "{r}"
    );
    assert_eq!(
        d.call("bdev_get_bdevs", Value::Null),
        json!([]),
        "the rejected command created something"
    );
    let r = q.cmd(json!({"execute": "bdev_get_bdevs", "arguments": {"name": "X"}}));
    assert_eq!(class(&r), "DeviceNotFound", "{r}");

    // Malformed input: each gets an error and the session continues.
    q.send(b"[1, 2]");
    assert!(q.line()["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("JSON object"));
    q.send(b"{\"execute\": }");
    assert!(q.line()["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("JSON parse error"));
    let r = q.cmd(json!({"arguments": {}}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("lacks member 'execute'"),
        "{r}"
    );
    let r = q.cmd(json!({"execute": "query-version", "arguments": [1]}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("'arguments' must be an object"),
        "{r}"
    );
    let r = q.cmd(json!({"execute": "query-version", "control": 1}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("'control' is unexpected"),
        "{r}"
    );
    q.send(b"garbage\n");
    assert_eq!(class(&q.line()), "GenericError");
    let r = q.cmd(json!({"execute": "query-version", "id": "after"}));
    assert_eq!(r["id"], "after", "{r}");

    // QMP-only commands are not JSON-RPC methods.
    assert_eq!(d.call_err("query-version", Value::Null)["code"], -32601);
}

#[test]
fn events_are_pushed_to_negotiated_clients_and_polled_over_jsonrpc() {
    let mut d = Daemon::start(&[]);
    let mut a = Qmp::negotiated(&d);
    let mut b = Qmp::negotiated(&d);
    let (mut pending, _) = Qmp::open(&d);
    // SPDK's notifications (`bdev_register`, `bdev_unregister`) stay on the
    // JSON-RPC side: no QMP client expects them.
    d.call(
        "bdev_null_create",
        json!({"name": "Ev0", "num_blocks": 8, "block_size": 512}),
    );
    let r =
        a.cmd(json!({"execute": "bdev_null_delete", "arguments": {"name": "Ev0"}, "id": "del"}));
    assert_eq!(r, json!({"return": true, "id": "del"}));
    for q in [&mut a, &mut b] {
        let got = q.drain(Duration::from_millis(300));
        assert_eq!(got, Vec::<Value>::new(), "SPDK notifications on QMP");
    }
    // QMP events (a job's) reach every negotiated client, after the reply of
    // the command that caused them.
    let img = d.dir.join("c0.img");
    let r = a.cmd(json!({"execute": "blockdev-create", "id": "mk",
        "arguments": {"job-id": "c0", "options": {"driver": "file", "filename": img, "size": 0}}}));
    assert_eq!(r, json!({"return": {}, "id": "mk"}));
    for q in [&mut a, &mut b] {
        let ev = q.line();
        assert_eq!(ev["event"], "JOB_STATUS_CHANGE", "{ev}");
        assert_eq!(ev["data"]["id"], "c0");
        assert!(
            ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000,
            "{ev}"
        );
        assert!(
            ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000,
            "{ev}"
        );
        let rest = q.drain(Duration::from_millis(300));
        assert!(
            rest.iter().all(|e| e["event"] == "JOB_STATUS_CHANGE"),
            "{rest:?}"
        );
    }
    // The unnegotiated client got nothing.
    pending
        .r
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(
        pending.r.read(&mut buf).is_err(),
        "an event reached a client before negotiation"
    );

    // JSON-RPC clients poll the same events, SPDK's way (the job's too).
    let n = d.call("notify_get_notifications", json!({}));
    let n = n.as_array().unwrap();
    assert_eq!(
        n[..2],
        [
            json!({"type": "bdev_register", "ctx": "Ev0", "id": 0, "data": {"name": "Ev0"}}),
            json!({"type": "bdev_unregister", "ctx": "Ev0", "id": 1, "data": {"name": "Ev0"}})
        ]
    );
    assert!(n[2..].iter().all(|e| e["type"] == "JOB_STATUS_CHANGE"));
    assert_eq!(
        d.call("notify_get_notifications", json!({"id": 1}))
            .as_array()
            .unwrap()
            .len(),
        n.len() - 1
    );
    assert_eq!(
        d.call("notify_get_notifications", json!({"id": 0, "max": 1}))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        d.call("notify_get_notifications", json!({"id": n.len()})),
        json!([])
    );
    let types = d.call("notify_get_types", Value::Null);
    assert!(
        types.as_array().unwrap().contains(&json!("bdev_register")),
        "{types}"
    );
}

#[test]
fn quit_replies_then_stops_the_daemon() {
    let d = Daemon::start(&[]);
    let mut q = Qmp::negotiated(&d);
    let mut watcher = Qmp::negotiated(&d);
    let r = q.cmd(json!({"execute": "quit", "id": 5}));
    assert_eq!(r, json!({"return": {}, "id": 5}));
    assert_eq!(watcher.line()["event"], "SHUTDOWN");
    let mut d = d;
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "daemon did not stop after quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}");
    assert!(
        !d.qmp_sock.exists() && !d.rpc_sock.exists(),
        "sockets left behind"
    );
}

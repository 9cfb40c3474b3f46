//! Hostile input on the JSON-RPC socket, through the real daemon: requests
//! that can never become valid JSON are answered -32700 at once and the
//! connection closed (as SPDK's jsonrpc_server does), ids come back verbatim,
//! batches are bounded, and connections cannot hold their slots for good.

use serde_json::{json, Value};
use sluice_tests::Daemon;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn open(d: &Daemon) -> Conn {
        let s = UnixStream::connect(&d.rpc_sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("send");
    }
    /// One reply line, verbatim.
    fn line(&mut self, what: &str) -> String {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(n) if n > 0 => line,
            Ok(_) => panic!("{what}: connection closed instead of replying"),
            Err(e) => panic!("{what}: no reply within 5 s ({e})"),
        }
    }
    fn reply(&mut self, what: &str) -> Value {
        let line = self.line(what);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: reply {line:?}: {e}"))
    }
    /// Whether the server closed the connection (EOF within 2 s).
    fn closed(&mut self) -> bool {
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0))
    }
}

/// Requests that no continuation can make valid, one per kind the issue found.
const HOPELESS: &[&[u8]] = &[
    b"{x",
    b"{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"id\":1,{{{",
    b"{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"params\":{\"a\":[}}",
    b"{\"jsonrpc\":\"2.0\",,\"method\":\"spdk_get_version\"",
    b"{\"jsonrpc\"::\"2.0\"",
    b"{\"jsonrpc\":\"2.0\":",
    b"{:",
    b"[,",
    b"[1 2",
    b"{\"jsonrpc\":\"2.0\",\"method\":\"a\x01b\"",
    b"{\"jsonrpc\":\"2.0\",\"method\":\"a\xffb\"",
    b"{\"jsonrpc\":\"2.0\",\"method\":\"a\xc3(\"",
    b"{\"jsonrpc\":\"2.0\",\"method\":\"\\q\"",
    b"{\"id\":tru}",
    b"{\"id\":01}",
    b"{\"id\":-}",
    b"{\"id\":1.}",
    b"[{\"a\":1]",
    b"{\"a\":[1}",
    b"{\"a\":1,}",
    b"[1,]",
    b"{'jsonrpc':'2.0'}",
];

#[test]
fn hopeless_json_gets_parse_error_at_once_and_the_connection_closes() {
    let mut d = Daemon::start(&[]);
    for input in HOPELESS {
        let what = String::from_utf8_lossy(input).into_owned();
        let mut c = Conn::open(&d);
        // A valid request follows: it must not be swallowed into the bad one
        // nor answered (the stream cannot be trusted any more).
        let t0 = Instant::now();
        c.send(input);
        // (The server may have closed already: a failed send is fine.)
        let _ = c
            .w
            .write_all(b"\n{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":\"after\"}");
        let r = c.reply(&what);
        assert!(t0.elapsed() < Duration::from_secs(2), "{what}: slow reply");
        assert_eq!(r["error"]["code"], -32700, "{what}: {r}");
        assert_eq!(r["id"], Value::Null, "{what}: {r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("Parse error: ") && msg.contains(" at byte "),
            "{what}: {r}"
        );
        assert!(c.closed(), "{what}: connection left open after -32700");
    }
    // The bad byte is named, with its offset.
    let mut c = Conn::open(&d);
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"id\":1,{{{");
    let r = c.reply("value as a key");
    assert_eq!(
        r["error"]["message"],
        "Parse error: '{' where a member name (a string) was expected at byte 37 of the request"
    );
    // Close without a newline after the bad bytes: the reply still comes.
    let mut c = Conn::open(&d);
    c.send(b"{x");
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.reply("{x then EOF")["error"]["code"], -32700);
    // Valid JSON of every shape still goes through.
    let mut c = Conn::open(&d);
    c.send("{\"jsonrpc\" : \"2.0\" ,\r\n\t\"method\":\"bdev_get_bdevs\",\"params\":{\"name\":\"\\u00e9\\\"\u{1F600}\"},\"id\":[]}".as_bytes());
    let r = c.reply("valid");
    assert_eq!(
        r["error"]["code"], -32600,
        "an array id is refused as before: {r}"
    );
    let r = d.call("spdk_get_version", Value::Null);
    assert!(r["version"].is_string(), "{r}");
    assert_eq!(d.stop(), Some(0));
}

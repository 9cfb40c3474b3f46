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

#[test]
fn ids_are_echoed_verbatim() {
    let d = Daemon::start(&[]);
    let mut c = Conn::open(&d);
    for id in [
        "123456789012345678901234567890",
        "-0",
        "1e2",
        "0.10",
        "-12.5E-3",
        "18446744073709551616",
        "\"\\u0041\\n\"",
        "\"\u{e9}\"",
        "null",
        "7",
    ] {
        for method in ["spdk_get_version", "no_such_method"] {
            c.send(
                format!("{{\"jsonrpc\":\"2.0\",\"method\":\"{method}\",\"id\": {id} }}").as_bytes(),
            );
            let line = c.line(id);
            assert!(
                line.starts_with(&format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},")),
                "{method} id {id} not echoed verbatim: {line}"
            );
        }
    }
    // In a batch too, and in the error about a bad member.
    c.send(b"[{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1E300},{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"bogus\":1,\"id\":-0.0}]");
    let line = c.line("batch");
    assert!(
        line.contains("\"id\":1E300,") && line.contains("\"id\":-0.0,"),
        "{line}"
    );
}

/// The daemon's resident set and its peak, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn get_bdevs(n: usize, from: usize) -> Vec<u8> {
    let items: Vec<Value> = (from..from + n)
        .map(|i| json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": i}))
        .collect();
    Value::Array(items).to_string().into_bytes()
}

#[test]
fn batches_are_bounded_in_count_and_reply_size() {
    let mut d = Daemon::start(&[]);
    // Bdevs enough to make one bdev_get_bdevs reply about 200 KB.
    for chunk in 0..3 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": format!("N{}-{i}", chunk), "num_blocks": 8, "block_size": 512}, "id": i}))
            .collect();
        let mut c = Conn::open(&d);
        c.send(Value::Array(items).to_string().as_bytes());
        let r = c.reply("creating bdevs");
        assert!(
            r.as_array()
                .is_some_and(|a| a.iter().all(|x| x["result"].is_string())),
            "{r}"
        );
    }
    let (_, peak0) = rss_kib(d.pid());

    // The 53 KB batch of 1,000 bdev_get_bdevs: refused whole, at once.
    let mut c = Conn::open(&d);
    let t0 = Instant::now();
    c.send(&get_bdevs(1000, 0));
    let r = c.reply("1000-request batch");
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("exceeds the limit of 128"),
        "{r}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    // 10,000: the same.
    c.send(&get_bdevs(10_000, 0));
    assert_eq!(c.reply("10000-request batch")["error"]["code"], -32600);

    // 128 of them fit the count but not the reply budget: the first run, the
    // rest get an error each, and the reply stays near the budget.
    c.send(&get_bdevs(128, 0));
    let line = c.line("128-request batch");
    let r: Value = serde_json::from_str(&line).expect("batch reply is JSON");
    let arr = r.as_array().expect("batch reply is an array");
    assert_eq!(arr.len(), 128, "one reply per request");
    let ran = arr.iter().filter(|x| x["result"].is_array()).count();
    let refused: Vec<&Value> = arr
        .iter()
        .filter(|x| x["error"]["code"] == -32600)
        .collect();
    assert!(
        ran > 0 && ran + refused.len() == 128,
        "ran {ran}, refused {}",
        refused.len()
    );
    assert!(!refused.is_empty(), "a {}-byte reply was built", line.len());
    assert_eq!(
        refused[0]["id"], ran,
        "the first over the budget is refused"
    );
    assert!(
        line.len() < (16 << 20) + 400_000,
        "reply of {} bytes",
        line.len()
    );
    let (_, peak1) = rss_kib(d.pid());
    eprintln!(
        "batch replies {} bytes; peak RSS {peak0} KiB -> {peak1} KiB",
        line.len()
    );
    assert!(
        peak1 < peak0 + 256 * 1024,
        "peak RSS grew from {peak0} KiB to {peak1} KiB"
    );
    assert!(d.call("spdk_get_version", Value::Null)["version"].is_string());
    assert_eq!(d.stop(), Some(0));
}

/// A fresh connection gets `spdk_get_version` answered (not refused).
fn served(d: &Daemon) -> bool {
    let Ok(s) = UnixStream::connect(&d.rpc_sock) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut c = Conn {
        w: s.try_clone().unwrap(),
        r: BufReader::new(s),
    };
    // (A refused connection may be closed before the request goes out.)
    if c.w
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1}")
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    matches!(c.r.read_line(&mut line), Ok(n) if n > 0) && line.contains("\"result\"")
}

/// Waits until earlier connections (the daemon's readiness probe, a
/// `served` check) have released their slots.
fn settle(d: &Daemon) {
    served_within(d, Duration::from_secs(5)).expect("daemon does not serve");
    std::thread::sleep(Duration::from_millis(300));
}

/// Polls [`served`] for up to `within`; how long it took.
fn served_within(d: &Daemon, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if served(d) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn endless_wait() -> &'static [u8] {
    b"{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"params\":{\"name\":\"never\",\"timeout\":18446744073709551615},\"id\":1}"
}

#[test]
fn waiting_calls_of_departed_clients_free_their_slots_and_stop_is_fast() {
    let d = Daemon::start(&["--rpc-max-connections", "4"]);
    settle(&d);
    // Four clients start an endless wait, then go away.
    for _ in 0..4 {
        let mut c = Conn::open(&d);
        c.send(endless_wait());
    }
    let took = served_within(&d, Duration::from_secs(5))
        .expect("slots still taken 5 s after the waiting clients left");
    eprintln!("slots free {took:?} after the clients left");
    settle(&d);
    // Four that stay: SIGTERM ends their waits at once.
    let mut stay: Vec<Conn> = (0..4).map(|_| Conn::open(&d)).collect();
    for c in &mut stay {
        c.send(endless_wait());
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    assert_eq!(d.stop(), Some(0));
    let stop = t0.elapsed();
    eprintln!("stop took {stop:?} with four calls waiting");
    assert!(stop < Duration::from_secs(3), "stop took {stop:?}");
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let d = Daemon::start(&["--rpc-max-connections", "4", "--rpc-idle-timeout", "1"]);
    settle(&d);
    let mut idle: Vec<Conn> = (0..4).map(|_| Conn::open(&d)).collect();
    // One of them left a request half sent: idle all the same.
    idle[0].send(b"{\"jsonrpc\":\"2.0\",");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!served(&d), "the cap of 4 is not in force");
    let took = served_within(&d, Duration::from_secs(5))
        .expect("idle connections still hold every slot after 5 s");
    eprintln!("idle slots free {took:?} later");
    for c in &mut idle {
        assert!(c.closed(), "an idle connection was left open");
    }
    // A busy client is not idle: a call that takes longer than the timeout
    // still gets its reply.
    let mut c = Conn::open(&d);
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"params\":{\"name\":\"late\",\"timeout\":1500},\"id\":9}");
    let r = c.reply("a 1.5 s wait");
    assert_eq!(r["id"], 9, "{r}");
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_client_that_reads_slowly_is_dropped_at_the_write_limit() {
    let d = Daemon::start(&["--rpc-max-connections", "1", "--rpc-write-timeout", "2"]);
    settle(&d);
    // Replies of about 200 KB each.
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"jsonrpc": "2.0", "method": "bdev_null_create", "params": {"name": format!("S{i}"), "num_blocks": 8, "block_size": 512}, "id": i}))
        .collect();
    {
        let mut c = Conn::open(&d);
        c.send(Value::Array(items[..100].to_vec()).to_string().as_bytes());
        c.reply("create");
        c.send(
            Value::Array(items[100..200].to_vec())
                .to_string()
                .as_bytes(),
        );
        c.reply("create");
        c.send(Value::Array(items[200..].to_vec()).to_string().as_bytes());
        c.reply("create");
    }
    std::thread::sleep(Duration::from_millis(300));
    // The slow reader: 20 replies asked, then 2 KB read every 100 ms
    // (each write makes progress, none finishes a reply within 2 s).
    let s = UnixStream::connect(&d.rpc_sock).expect("connect");
    let mut w = s.try_clone().unwrap();
    for i in 0..20 {
        w.write_all(
            format!("{{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"id\":{i}}}").as_bytes(),
        )
        .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let mut first = [0u8; 32];
    (&s).read_exact(&mut first).expect("first reply bytes");
    assert_eq!(
        &first, b"{\"jsonrpc\":\"2.0\",\"id\":0,\"result\"",
        "slow reader not admitted"
    );
    let reader = std::thread::spawn(move || {
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 2048];
        while !st.load(std::sync::atomic::Ordering::SeqCst) {
            match s.read(&mut b) {
                Ok(0) => break,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let took = served_within(&d, Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    reader.join().unwrap();
    let took = took.expect("a slowly reading client kept its connection past 8 s (limit 2 s)");
    eprintln!("slow reader dropped; slot free after {took:?}");
    assert_eq!(d.stop(), Some(0));
}

/// 1,000 mutations of a valid request (a byte inserted, deleted or replaced),
/// each followed by a valid request and the client's half-close. `serde_json`
/// is the oracle: where it finds a syntax error, a -32700 must come (before the
/// issue's fix, about one input in five got no reply at all); in every case
/// the server ends the connection within 3 s.
#[test]
fn mutated_requests_never_go_unanswered() {
    let d = Daemon::start(&[]);
    let base: &[u8] = b"{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"params\":{\"name\":\"x\\u00e9\",\"timeout\":0},\"id\":[1]}";
    let alphabet: &[u8] = b"{}[],:\"\\ x1-.e0tfn\x01\xff\xc3";
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut hopeless = 0;
    for round in 0..1000 {
        let mut input = base.to_vec();
        for _ in 0..1 + rnd(2) {
            let at = rnd(input.len());
            match rnd(3) {
                0 => input.insert(at, alphabet[rnd(alphabet.len())]),
                1 => {
                    input.remove(at);
                }
                _ => input[at] = alphabet[rnd(alphabet.len())],
            }
        }
        input.extend_from_slice(
            b"\n{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":\"probe\"}",
        );
        let syntax_error = serde_json::Deserializer::from_slice(&input)
            .into_iter::<Value>()
            .find_map(Result::err)
            .is_some_and(|e| !e.is_eof());
        let what = format!("round {round}: {}", String::from_utf8_lossy(&input));
        let s = UnixStream::connect(&d.rpc_sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = (&s).write_all(&input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let t0 = Instant::now();
        let r = BufReader::new(&s).read_to_string(&mut out);
        assert!(
            r.is_ok() && t0.elapsed() < Duration::from_secs(3),
            "{what}: connection not ended ({r:?}) after {out:?}"
        );
        if syntax_error {
            hopeless += 1;
            assert!(
                out.contains("\"code\":-32700"),
                "{what}: no -32700 in {out:?}"
            );
        }
    }
    eprintln!("{hopeless} of 1000 mutated inputs were not JSON; each got -32700");
    assert!(
        hopeless > 100,
        "the mutations rarely broke the JSON ({hopeless})"
    );
    assert_eq!(d.stop(), Some(0));
}

/// Over TCP a departed client shows only its FIN: a waiting call still sees
/// it (a peek finds the end of stream) and frees the slot.
#[test]
fn tcp_clients_that_leave_free_their_slots() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&["--rpc-listen", &addr, "--rpc-max-connections", "2"]);
    let call = |req: &[u8]| -> Option<String> {
        let s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (&s).write_all(req).ok()?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).ok()?;
        Some(line)
    };
    for _ in 0..2 {
        let s = std::net::TcpStream::connect(&addr).expect("connect");
        (&s).write_all(endless_wait()).unwrap();
        // Closed at once: the server sees a FIN, no hang-up.
    }
    let t0 = Instant::now();
    let version = b"{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1}";
    loop {
        if call(version).is_some_and(|l| l.contains("\"result\"")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "TCP slots still taken 5 s after the waiting clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("TCP slots free after {:?}", t0.elapsed());
    // A client that only half-closes over the Unix socket still gets its reply.
    let s = UnixStream::connect(&d.rpc_sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"params\":{\"name\":\"x\",\"timeout\":300},\"id\":2}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"id\":2"), "{line}");
    assert_eq!(d.stop(), Some(0));
}

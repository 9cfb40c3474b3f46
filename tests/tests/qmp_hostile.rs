//! Hostile input on the QMP socket, answered byte for byte as
//! qemu-storage-daemon answers it: QEMU's lexer recovers token by token
//! (`true{...}` gets an error for `true` and then runs the command), ids are
//! echoed as QEMU re-writes them (`1e2` as `100`, `-0` as `0`, big integers
//! as `%.17g` doubles), parse errors carry QEMU's words.

use sluice_tests::{Daemon, TempDir};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Inputs whose brackets balance (QEMU waits for more otherwise), each
/// followed on the same connection by a sentinel command.
const INPUTS: &[&[u8]] = &[
    // Nesting past QEMU's 1024 (then the brackets left balance).
    NESTED,
    b"true{\"execute\":\"query-block-jobs\",\"id\":\"s\"}",
    b"]{\"execute\":\"query-block-jobs\",\"id\":5}",
    b"{\"execute\":\"query-block-jobs\", \"id\": \"a\x01b\"}\n{\"execute\":\"query-block-jobs\",\"id\":6}",
    b"{\"execute\":\"query-block-jobs\", \"id\": \"a\xffb\"}\n{\"execute\":\"query-block-jobs\",\"id\":7}",
    b"{\"execute\":\"query-block-jobs\",,\"id\":8}",
    b"{\"execute\"::\"query-block-jobs\",\"id\":9}",
    b"hello\n{\"execute\":\"query-block-jobs\",\"id\":10}",
    b"[1,2]",
    b"123 {\"execute\":\"query-block-jobs\",\"id\":11}",
    b"@{\"execute\":\"query-block-jobs\",\"id\":12}",
    b"nul{\"execute\":\"query-block-jobs\",\"id\":13}",
    b"{\"execute\":\"query-block-jobs\",\"id\":01}",
    b"{\"execute\": \"query-block-jobs\", \"id\": 14\xff{\"execute\":\"query-block-jobs\",\"id\":15}",
    b"{\"a\":1]}",
    b"{\"execute\":\"query-block-jobs\",\"id\":1,\"id\":2}",
    b"{\"execute\":\"query-block-jobs\",\"id\":\"x\xe9\"}",
    b"{\"execute\":\"query-block-jobs\",\"id\":\"\\q\"}",
    b"{\"execute\":\"query-block-jobs\",\"id\":\"\\ud800x\"}",
    b"{\"execute\":\"query-block-jobs\",\"id\":123456789012345678901234567890}",
    b"{\"execute\":\"query-block-jobs\",\"id\":-0}",
    b"{\"execute\":\"query-block-jobs\",\"id\":1e2}",
    b"{\"execute\":\"query-block-jobs\",\"id\":0.1}",
    b"{\"execute\":\"query-block-jobs\",\"id\":-0.0}",
    b"{\"execute\":\"query-block-jobs\",\"id\":18446744073709551615}",
    b"{\"execute\":\"query-block-jobs\",\"id\":-9223372036854775809}",
    b"{\"execute\":\"query-block-jobs\",\"id\":[1, 2.50, {\"a\":-0}, true, null]}",
    b"{\"execute\":\"query-block-jobs\",\"id\":\"x\\u00e9\\ud83d\\ude00\\t\"}",
    b"{'execute':'query-block-jobs','id':'sq'}",
    b"{\"execute\":\"no-such-command\",\"id\":1}",
    b"{\"execute\":\"query-block-jobs\",\"id\":1,\"bogus\":2}",
    b"{\"id\":1}",
    b"{\"execute\":1,\"id\":1}",
    b"[]{}",
    b"  \xff{\"execute\":\"query-block-jobs\",\"id\":16}",
    b"\x00{\"execute\":\"query-block-jobs\",\"id\":17}",
    b"TRUE{\"execute\":\"query-block-jobs\",\"id\":18}",
    b"{\"execute\":\"query-block-jobs\",\"id\":\"\\u12\"}",
    b"{\"execute\":\"query-block-jobs\",\"arguments\":[1],\"id\":19}",
    b"{\"execute\":\"query-block-jobs\",\"id\":{\"b\":1,\"a\":2,\"id\":3}}",
    b"{\"execute\":\"query-block-jobs\",\"id\":1.5e308}",
    b"{\"execute\":\"query-block-jobs\",\"id\":-1e-7}",
    b"{\"execute\":\"qmp_capabilities\",\"id\":20}",
];

const NESTED: &[u8] = &{
    let mut b = [b']'; 1035];
    let mut i = 0;
    while i < 1030 {
        b[i] = b'[';
        i += 1;
    }
    b
};

const SENTINEL: &[u8] = b"\n{\"execute\":\"query-block-jobs\",\"id\":\"end\"}\n";

/// Every reply line to `input` on a fresh negotiated connection, up to the
/// sentinel's reply (excluded).
fn replies(sock: &Path, input: &[u8]) -> Vec<String> {
    let s = UnixStream::connect(sock).expect("connect QMP");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).expect("capabilities reply");
    w.write_all(input).unwrap();
    w.write_all(SENTINEL).unwrap();
    let mut out = Vec::new();
    loop {
        let mut l = Vec::new();
        match r.read_until(b'\n', &mut l) {
            Ok(n) if n > 0 => {}
            other => panic!(
                "{}: reply stream ended ({other:?}) after {out:?}",
                String::from_utf8_lossy(input)
            ),
        }
        let l = String::from_utf8(l).expect("QMP output is UTF-8");
        if l.contains("\"id\": \"end\"") {
            return out;
        }
        out.push(l);
    }
}

struct Qsd {
    child: Child,
    sock: std::path::PathBuf,
    _dir: TempDir,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd() -> Option<Qsd> {
    let dir = TempDir::new("qsd");
    let sock = dir.join("qmp.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,id=c,path={},server=on,wait=off",
            sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=c")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            let why = format!("qemu-storage-daemon cannot run ({e}); skipping the comparison");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("{why}");
            return None;
        }
    };
    let q = Qsd {
        child,
        sock,
        _dir: dir,
    };
    let t0 = Instant::now();
    while UnixStream::connect(&q.sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(q)
}

#[test]
fn bad_tokens_and_ids_answered_byte_for_byte_as_qemu_storage_daemon() {
    let d = Daemon::start(&[]);
    let Some(q) = qsd() else { return };
    let mut differ = Vec::new();
    for input in INPUTS {
        let ours = replies(&d.qmp_sock, input);
        let theirs = replies(&q.sock, input);
        if ours != theirs {
            differ.push(format!(
                "{}\n  sluice: {ours:?}\n  qsd:    {theirs:?}",
                String::from_utf8_lossy(input)
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "replies differ from qemu-storage-daemon's:\n{}",
        differ.join("\n")
    );
    // The daemon is still well.
    assert_eq!(replies(&d.qmp_sock, b"").len(), 0);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn the_command_after_a_bad_token_runs() {
    let d = Daemon::start(&[]);
    let got = replies(
        &d.qmp_sock,
        b"true{\"execute\":\"query-block-jobs\",\"id\":\"s\"}",
    );
    assert_eq!(
        got,
        [
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}\r\n",
            "{\"return\": [], \"id\": \"s\"}\r\n"
        ]
    );
    assert_eq!(d.stop(), Some(0));
}

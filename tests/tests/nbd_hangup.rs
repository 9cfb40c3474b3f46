//! NBD clients that hang up in the middle of a request: the server notices the
//! end of stream even when it arrives together with the last bytes (one
//! readiness edge for both), so no connection is left established and a safe
//! `block-export-del` succeeds.

mod nbd_common;

use nbd_common::*;
use serde_json::json;
use sluice_tests::qemu_io;
use std::net::Shutdown;

/// Bytes that stop at a bad place: inside a header, or inside a write payload.
fn cut(i: usize) -> Vec<u8> {
    let write = Raw::encode_request(0, CMD_WRITE, i as u64, 0, 65536, &[0x11; 65536]);
    let read = Raw::encode_request(0, CMD_READ, i as u64, 0, 4096, &[]);
    match i % 4 {
        0 => read[..1 + i % 27].to_vec(),
        1 => write[..28 + 1 + (i * 997) % 65000].to_vec(),
        2 => write[..13].to_vec(),
        _ => {
            // A whole read, then half a header: the reply and the cut overlap.
            let mut v = read.clone();
            v.extend_from_slice(&read[..14]);
            v
        }
    }
}

#[test]
fn hangup_mid_header_or_payload_leaves_no_connection() {
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("m0", 4);
    n.export("m0", true);
    for i in 0..120 {
        let (r, _, _) = Raw::attach(&n.sock, "m0", false, false);
        // The last bytes and the end of stream leave together (one edge).
        let mut bytes = cut(i);
        let s = &r.s;
        use std::io::Write;
        let _ = (&*s).write_all(&std::mem::take(&mut bytes));
        let _ = s.shutdown(Shutdown::Write);
        drop(r);
    }
    // Every connection must be gone: a safe delete is refused while one is left.
    let reply = n.d.call_raw("block-export-del", json!({"id": "m0"}));
    assert!(
        reply.get("error").is_none(),
        "connections leaked after clients hung up mid-request: {reply}"
    );
    n.wait_exports(|v| v.as_array().is_some_and(|a| a.is_empty()));
    // The server still serves.
    n.malloc("m1", 4);
    n.export("m1", true);
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
        &n.uri("m1"),
    ]);
}

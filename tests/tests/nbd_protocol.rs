//! The NBD protocol at the byte level: handshake options and their errors,
//! malformed handshakes and requests, error replies with the right errno,
//! pipelining, abrupt disconnects with writes in flight.

mod nbd_common;

use nbd_common::*;
use sluice_tests::qemu_io;

fn daemon() -> NbdDaemon {
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.malloc("m0", 16);
    n.export("m0", true);
    n.malloc("ro", 4);
    n.export("ro", false);
    n
}

/// The server still serves a real client.
fn still_serving(n: &NbdDaemon) {
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
        &n.uri("m0"),
    ]);
}

#[test]
fn option_haggling_errors_and_successes() {
    let n = daemon();
    let mut r = Raw::connect_flags(&n.sock);
    r.opt(77, b"whatever");
    assert_eq!(r.reply().ty, REP_ERR_UNSUP);
    r.opt(OPT_STARTTLS, &[]);
    assert_eq!(r.reply().ty, REP_ERR_POLICY);
    r.opt(OPT_LIST, b"x");
    assert_eq!(r.reply().ty, REP_ERR_INVALID);
    r.opt(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        r.reply().ty,
        REP_ERR_INVALID,
        "meta contexts need structured replies first"
    );
    r.opt(OPT_GO, &[0, 0, 0, 9, b'm']);
    assert_eq!(r.reply().ty, REP_ERR_INVALID, "truncated GO data");
    r.opt(OPT_GO, &Raw::go_data("nosuch", &[]));
    let e = r.reply();
    assert_eq!(e.ty, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&e.data).contains("nosuch"));
    r.opt(OPT_INFO, &vec![0u8; 100 * 1024]);
    assert_eq!(r.reply().ty, REP_ERR_TOO_BIG);
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().ty, REP_ACK);
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().ty, REP_ERR_INVALID, "negotiated twice");
    r.opt(OPT_LIST, &[]);
    let reps = r.replies();
    let names: Vec<String> = reps
        .iter()
        .filter(|x| x.ty == REP_SERVER)
        .map(|x| {
            String::from_utf8_lossy(&x.data[4..4 + be32_of(&x.data[0..4]) as usize]).to_string()
        })
        .collect();
    assert_eq!(names, ["m0", "ro"]);
    assert_eq!(reps.last().map(|x| x.ty), Some(REP_ACK));
    r.opt(OPT_INFO, &Raw::go_data("ro", &[1, 3]));
    let reps = r.replies();
    assert_eq!(reps.last().map(|x| x.ty), Some(REP_ACK));
    let export = reps
        .iter()
        .find(|x| x.data[0..2] == [0, 0])
        .expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export.data[2..10].try_into().unwrap()),
        4 << 20
    );
    let flags = u16::from_be_bytes([export.data[10], export.data[11]]);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert!(
        reps.iter().any(|x| x.data[0..2] == [0, 3]),
        "block sizes sent"
    );
    // Still in option haggling after INFO: GO works.
    r.opt(OPT_GO, &Raw::go_data("m0", &[]));
    let reps = r.replies();
    assert_eq!(reps.last().map(|x| x.ty), Some(REP_ACK));
    let export = reps
        .iter()
        .find(|x| x.data[0..2] == [0, 0])
        .expect("INFO_EXPORT");
    let flags = u16::from_be_bytes([export.data[10], export.data[11]]);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    r.request(0, CMD_DISC, 1, 0, 0, &[]);
    assert!(r.closed());
    still_serving(&n);
}

#[test]
fn malformed_handshakes_close_only_their_connection() {
    let n = daemon();
    // A client that holds an attached connection through all of this.
    let (mut keep, _, _) = Raw::attach(&n.sock, "m0", false, false);
    // Unknown client flags.
    let mut r = Raw::connect(&n.sock);
    r.send(&0x8000_0003u32.to_be_bytes());
    assert!(r.closed());
    // Option without IHAVEOPT.
    let mut r = Raw::connect_flags(&n.sock);
    r.send(&[0xde; 16]);
    assert!(r.closed());
    // EXPORT_NAME of an unknown export cannot be answered: the session ends.
    let mut r = Raw::connect_flags(&n.sock);
    r.opt(OPT_EXPORT_NAME, b"nosuch");
    assert!(r.closed());
    // A giant option length.
    let mut r = Raw::connect_flags(&n.sock);
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    r.send(&v);
    assert!(r.closed());
    // Half an option, then gone; and a connection that says nothing at all.
    let mut r = Raw::connect_flags(&n.sock);
    r.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(r);
    let silent = std::os::unix::net::UnixStream::connect(&n.sock).expect("connect");
    // ABORT is acknowledged.
    let mut r = Raw::connect_flags(&n.sock);
    r.opt(OPT_ABORT, &[]);
    assert_eq!(r.reply().ty, REP_ACK);
    assert!(r.closed());
    // EXPORT_NAME of a real export enters transmission (with NO_ZEROES: 10 bytes).
    let mut r = Raw::connect_flags(&n.sock);
    r.opt(OPT_EXPORT_NAME, b"m0");
    let info = r.read_n(10);
    assert_eq!(u64::from_be_bytes(info[0..8].try_into().unwrap()), 16 << 20);
    let d = r.read_simple(5, 0, 4096);
    assert_eq!(d.len(), 4096);
    still_serving(&n);
    // The first connection is unharmed.
    let d = keep.read_simple(9, 0, 65536);
    assert!(d.iter().all(|&b| b == 0x5a));
    drop(silent);
}

#[test]
fn bad_requests_get_the_right_errno() {
    let n = daemon();
    let (mut r, size, _) = Raw::attach(&n.sock, "m0", false, false);
    assert_eq!(size, 16 << 20);
    r.request(0, CMD_READ, 1, size, 512, &[]);
    assert_eq!(r.simple(), (EINVAL, 1), "read beyond the end");
    r.request(0, CMD_WRITE, 2, size - 512, 1024, &[7u8; 1024]);
    assert_eq!(r.simple(), (ENOSPC, 2), "write beyond the end");
    r.request(0, CMD_WRITE_ZEROES, 3, u64::MAX - 100, 512, &[]);
    assert_eq!(r.simple(), (ENOSPC, 3), "overflowing write-zeroes");
    r.request(0, CMD_READ, 4, 1, 512, &[]);
    assert_eq!(r.simple(), (EINVAL, 4), "misaligned read");
    r.request(0, CMD_READ, 5, 0, 64 << 20, &[]);
    assert_eq!(
        r.simple(),
        (EINVAL, 5),
        "read larger than the maximum block size"
    );
    r.request(0, 99, 6, 0, 0, &[]);
    assert_eq!(r.simple(), (EINVAL, 6), "unknown command");
    r.request(0x4000, CMD_READ, 7, 0, 512, &[]);
    assert_eq!(r.simple(), (EINVAL, 7), "unknown flag");
    r.request(0, CMD_BLOCK_STATUS, 8, 0, 4096, &[]);
    assert_eq!(r.simple(), (EINVAL, 8), "block status without a context");
    // The payload of a refused write was consumed: the stream stays in sync.
    r.request(FLAG_FUA, CMD_WRITE, 9, 8192, 512, &[0x33; 512]);
    assert_eq!(r.simple(), (0, 9));
    r.request(0, CMD_FLUSH, 10, 0, 0, &[]);
    assert_eq!(r.simple(), (0, 10));
    assert!(r.read_simple(11, 8192, 512).iter().all(|&b| b == 0x33));
    r.request(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 12, 8192, 512, &[]);
    assert_eq!(r.simple(), (0, 12));
    assert!(r.read_simple(13, 8192, 512).iter().all(|&b| b == 0));
    r.request(0, CMD_CACHE, 14, 0, 4096, &[]);
    assert_eq!(r.simple(), (0, 14));
    r.request(0, CMD_TRIM, 15, 0, 4096, &[]);
    assert_eq!(r.simple(), (0, 15));

    // Read-only export: writes, trims and zeroes are EPERM, reads work.
    let (mut ro, _, flags) = Raw::attach(&n.sock, "ro", false, false);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    ro.request(0, CMD_WRITE, 1, 0, 4096, &[1u8; 4096]);
    assert_eq!(ro.simple(), (EPERM, 1));
    ro.request(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(ro.simple(), (EPERM, 2));
    ro.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(ro.simple(), (EPERM, 3));
    assert_eq!(ro.read_simple(4, 0, 4096).len(), 4096);
}

#[test]
fn structured_replies_and_block_status() {
    let n = daemon();
    let (mut r, _, _) = Raw::attach(&n.sock, "m0", true, true);
    r.request(0, CMD_WRITE, 1, 4096, 4096, &[0xc3; 4096]);
    assert_eq!(r.any_reply(), (0, 1));
    r.request(0, CMD_READ, 2, 4096, 4096, &[]);
    let (flags, ty, cookie, p) = r.chunk();
    assert_eq!((flags & 1, ty, cookie), (1, CHUNK_OFFSET_DATA, 2));
    assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), 4096);
    assert!(p[8..].iter().all(|&b| b == 0xc3) && p.len() == 8 + 4096);
    r.request(0, CMD_READ, 3, 1 << 40, 4096, &[]);
    let (flags, ty, cookie, p) = r.chunk();
    assert_eq!((flags & 1, ty, cookie), (1, CHUNK_ERROR, 3));
    assert_eq!(be32_of(&p[0..4]), EINVAL);
    r.request(0, CMD_BLOCK_STATUS, 4, 0, 1 << 20, &[]);
    let (flags, ty, cookie, p) = r.chunk();
    assert_eq!((flags & 1, ty, cookie), (1, CHUNK_BLOCK_STATUS, 4));
    assert_eq!(be32_of(&p[0..4]), 1, "base:allocation context id");
    assert_eq!(be32_of(&p[4..8]), 1 << 20, "one data extent over the range");
    assert_eq!(be32_of(&p[8..12]), 0);
}

#[test]
fn pipelined_requests_all_answered_and_bad_magic_closes() {
    let n = daemon();
    let (mut r, _, _) = Raw::attach(&n.sock, "m0", false, false);
    // 200 requests before reading any reply.
    let mut batch = Vec::new();
    for i in 0..200u64 {
        batch.extend_from_slice(&Raw::encode_request(
            0,
            CMD_WRITE,
            1000 + i,
            i * 4096,
            4096,
            &[i as u8; 4096],
        ));
    }
    r.send(&batch);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let (e, c) = r.simple();
        assert_eq!(e, 0);
        assert!(seen.insert(c));
    }
    assert_eq!(seen.len(), 200);
    for i in [0u64, 77, 199] {
        assert!(r
            .read_simple(i, i * 4096, 4096)
            .iter()
            .all(|&b| b == i as u8));
    }
    let (mut other, _, _) = Raw::attach(&n.sock, "m0", false, false);
    r.send(&[0xff; 28]);
    assert!(r.closed(), "bad request magic closes the connection");
    assert!(other
        .read_simple(1, 77 * 4096, 4096)
        .iter()
        .all(|&b| b == 77));
}

#[test]
fn abrupt_disconnect_loses_nothing_in_flight() {
    let n = daemon();
    let (mut r, _, _) = Raw::attach(&n.sock, "m0", false, false);
    let mut batch = Vec::new();
    for i in 0..64u64 {
        batch.extend_from_slice(&Raw::encode_request(
            0,
            CMD_WRITE,
            i,
            (1 << 20) + i * 65536,
            65536,
            &[0xa0 ^ i as u8; 65536],
        ));
    }
    r.send(&batch);
    // Gone without reading a single reply (a reset if replies were pending).
    drop(r);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (mut c, _, _) = Raw::attach(&n.sock, "m0", false, false);
    for i in 0..64u64 {
        let d = c.read_simple(i, (1 << 20) + i * 65536, 65536);
        assert!(d.iter().all(|&b| b == 0xa0 ^ i as u8), "write {i} lost");
    }
    still_serving(&n);
}

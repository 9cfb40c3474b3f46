//! Power-loss crash states of the real daemon (issue #17): the top image of a
//! chain is opened over `bdev_record_create` (a recording bdev over its
//! file), a raw NBD client writes (some with FUA, some flushed, some not),
//! `block-stream` runs to completion with client writes beside it, more
//! writes follow, then `blockdev-snapshot-sync` makes the image a backing
//! file. Marks in the log (`bdev_record_mark`) say when the client saw each
//! reply and when the stream and the snapshot were reported done. Every
//! crash state the log allows is then checked (`bdev::record::check`):
//! `qemu-img check` finds no corruption, sluice and qemu-img open and read
//! it alike, every write acknowledged before a completed flush (or with FUA,
//! or before the snapshot, which flushes) reads back, and after the stream's
//! completion the image names no backing file and holds all the data.

mod nbd_common;

use bdev::record::check::{check_state, Expect, Tally};
use bdev::record::oracle::Oracle;
use bdev::record::replay::{self, Plan};
use bdev::record::Log;
use nbd_common::{NbdDaemon, Raw, CMD_FLUSH, CMD_WRITE, FLAG_FUA};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use serde_json::json;
use sluice_tests::{qemu_img, qemu_io, soak, TempDir};
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;
const SLOT: u64 = 64 << 10;

/// The client: NBD writes and flushes, each bracketed by log marks.
struct Client<'a> {
    d: &'a mut NbdDaemon,
    nbd: Raw,
    o: Oracle,
    cookie: u64,
    rng: u64,
}

impl Client<'_> {
    fn mark(&mut self, label: &str) -> u64 {
        self.d
            .d
            .call("bdev_record_mark", json!({"name": "rec0", "label": label}))["seq"]
            .as_u64()
            .expect("seq")
    }

    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    /// Up to 4 writes in flight together, in distinct slots; then, half the
    /// time, a flush.
    fn round(&mut self) {
        let k = 1 + self.rand(4);
        let mut slots: Vec<u64> = Vec::new();
        let seq = self.mark("submit");
        let mut sent = Vec::new();
        for _ in 0..k {
            let s = self.rand(SIZE / SLOT);
            if slots.contains(&s) {
                continue;
            }
            slots.push(s);
            let len = 4096 * (1 + self.rand(8));
            let off = s * SLOT + 4096 * self.rand((SLOT - len) / 4096 + 1);
            let fua = self.rand(5) == 0;
            let g = self.o.submit_write(off, len, seq);
            self.cookie += 1;
            let data = Oracle::data(g, off, len);
            let flags = if fua { FLAG_FUA } else { 0 };
            self.nbd
                .request(flags, CMD_WRITE, self.cookie, off, len as u32, &data);
            sent.push((g, fua));
        }
        for _ in 0..sent.len() {
            let (err, _) = self.nbd.simple();
            assert_eq!(err, 0, "NBD write failed");
        }
        let seq = self.mark("acked");
        for (g, fua) in sent {
            self.o.acked(g, fua, seq);
        }
        if self.rand(2) == 0 {
            let t = self.o.flush_submitted();
            self.cookie += 1;
            self.nbd.request(0, CMD_FLUSH, self.cookie, 0, 0, &[]);
            assert_eq!(self.nbd.simple().0, 0, "NBD flush failed");
            let seq = self.mark("flushed");
            self.o.flushed(t, seq);
        }
    }
}

/// Replays the log at `log` over `initial` and checks every crash state:
/// the result is due from seq `done`; `oracle_before` as
/// [`Expect::oracle_before_result`]. Returns the tally and the number of
/// durability points.
fn check_log(
    log: &str,
    initial: &[u8],
    work: &TempDir,
    oracle: &Oracle,
    done: u64,
    oracle_before: bool,
) -> (Tally, usize) {
    let bytes = std::fs::read(log).unwrap();
    let log = Log::parse_truncated(&bytes).expect("record log");
    let rt = Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .expect("runtime");
    let h = rt.handle();
    let x = Expect {
        oracle,
        result_after: Some(done),
        oracle_before_result: oracle_before,
        compare_every: 7,
    };
    let plan = Plan {
        max_prefixes: 8,
        random: 6,
        torn: true,
        seed: 0xe2e,
        lose_point: None,
    };
    let mut t = Tally::default();
    let mut shown = 0;
    let out = replay::replay(&log, initial, &work.join("state.qcow2"), &plan, |st| {
        t.states += 1;
        let r = check_state(&h, st, &x);
        match &r {
            Ok(true) => t.compared += 1,
            Ok(false) => {}
            Err(f) => {
                t.count(f);
                if shown < 3 {
                    shown += 1;
                    eprintln!("state {st:?}: {f}");
                }
            }
        }
        r.map(|_| ())
    })
    .expect("replay");
    (t, out.points)
}

/// Records the scenario (the stream `x-durable` or not) and checks every
/// crash state; returns the tally.
fn scenario(durable: bool) -> Tally {
    let work = TempDir::new("crash-e2e");
    let p = |n: &str| work.join(n).to_str().unwrap().to_string();
    let (base, top, log) = (p("base.qcow2"), p("top.qcow2"), p("rec.log"));
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "8M"]);
    qemu_io(&["-c", "write -P 0x11 0 6M", &base]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(&["-c", "write -P 0x31 1M 512k", &top]);
    // The guest's disk before anything is recorded.
    let raw = p("before.raw");
    qemu_img(&["convert", "-O", "raw", &top, &raw]);
    let guest = std::fs::read(&raw).unwrap();
    // Room for the image to grow inside its bdev.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&top)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let initial = std::fs::read(&top).unwrap();

    let mut d = NbdDaemon::start(&["-m", "0x1"], &[]);
    d.d.call(
        "bdev_uring_create",
        json!({"name": "topfile", "filename": top, "direct": false}),
    );
    d.d.call(
        "bdev_record_create",
        json!({"name": "rec0", "base_bdev_name": "topfile", "log_path": log}),
    );
    d.d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "node_name": "top0", "base_bdev": "rec0", "direct": false}),
    );
    d.export("vd0", true);
    let (nbd, size, _) = Raw::attach(&d.sock, "vd0", false, false);
    assert_eq!(size, SIZE);
    let mut c = Client {
        d: &mut d,
        nbd,
        o: Oracle::new(guest),
        cookie: 0,
        rng: 0x9e37_79b9,
    };
    let rounds = soak() as u64 * 40 + 8;
    for _ in 0..rounds {
        c.round();
    }
    c.d.d.call(
        "block-stream",
        json!({"job-id": "s0", "device": "vd0", "speed": 4 << 20, "x-durable": durable}),
    );
    // Client writes while the stream copies.
    for _ in 0..rounds {
        c.round();
    }
    let t0 = Instant::now();
    while c.d.d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the stream never ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = c.mark("stream complete");
    // A durable stream flushed everything before its header change.
    c.o.all_durable(done);
    for _ in 0..rounds {
        c.round();
    }
    c.d.d.call(
        "blockdev-snapshot-sync",
        json!({"device": "vd0", "snapshot-file": p("snap.qcow2"), "format": "qcow2"}),
    );
    let snap = c.mark("snapshot");
    // The snapshot flushed the old top before it became a backing file.
    c.o.all_durable(snap);
    let oracle = std::mem::replace(&mut c.o, Oracle::new(Vec::new()));
    drop(c);

    let (t, points) = check_log(&log, &initial, &work, &oracle, done, true);
    let _ = snap;
    println!(
        "crash states [daemon: NBD writes, block-stream (x-durable: {durable}), blockdev-snapshot-sync; {} durability points]: {t}",
        points
    );
    assert_eq!(d.d.stop(), Some(0));
    t
}

#[test]
fn crash_states_of_a_stream_and_a_snapshot_through_the_daemon() {
    let t = scenario(true);
    assert!(t.clean(), "{t}");
    assert!(t.states >= 100, "only {} states", t.states);
    assert!(t.compared > 0);
}

/// The checker fails a stream that reports completion before its result is
/// durable (`x-durable: false`, QEMU's behaviour): some state after the
/// reported end still names the backing file or lacks data.
#[test]
fn crash_checker_catches_a_non_durable_stream_through_the_daemon() {
    let t = scenario(false);
    assert!(t.job > 0, "a non-durable stream passed: {t}");
}

/// An active commit through the daemon with the base recorded: client
/// writes (into top) before and while the commit mirrors them into base,
/// `block-job-complete` pivots the export onto base, writes go on into base.
/// Before the pivot a state of base must only pass `qemu-img check` and
/// open; once the completion was reported, base is the guest's disk: every
/// write acknowledged before it, and every flushed one after, reads back.
#[test]
fn crash_states_of_an_active_commit_pivot_through_the_daemon() {
    let work = TempDir::new("crash-commit");
    let p = |n: &str| work.join(n).to_str().unwrap().to_string();
    let (base, top, log) = (p("base.qcow2"), p("top.qcow2"), p("rec.log"));
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "8M"]);
    qemu_io(&["-c", "write -P 0x11 0 6M", &base]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(&[
        "-c",
        "write -P 0x31 1M 512k",
        "-c",
        "write -z 3M 256k",
        &top,
    ]);
    let raw = p("before.raw");
    qemu_img(&["convert", "-O", "raw", &top, &raw]);
    let guest = std::fs::read(&raw).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let initial = std::fs::read(&base).unwrap();

    let mut d = NbdDaemon::start(&["-m", "0x1"], &[]);
    d.d.call(
        "bdev_uring_create",
        json!({"name": "basefile", "filename": base, "direct": false}),
    );
    d.d.call(
        "bdev_record_create",
        json!({"name": "rec0", "base_bdev_name": "basefile", "log_path": log}),
    );
    d.d.call(
        "bdev_qcow2_open",
        json!({"node_name": "base0", "base_bdev": "rec0", "direct": false}),
    );
    d.d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "node_name": "top0", "filename": top,
               "backing": "base0", "direct": false}),
    );
    d.export("vd0", true);
    let (nbd, size, _) = Raw::attach(&d.sock, "vd0", false, false);
    assert_eq!(size, SIZE);
    let mut c = Client {
        d: &mut d,
        nbd,
        o: Oracle::new(guest),
        cookie: 0,
        rng: 0x5151_7a7a,
    };
    let rounds = soak() as u64 * 40 + 8;
    for _ in 0..rounds {
        c.round();
    }
    c.d.d.call(
        "block-commit",
        json!({"job-id": "c0", "device": "vd0", "speed": 4 << 20}),
    );
    for _ in 0..rounds {
        c.round();
    }
    let t0 = Instant::now();
    loop {
        let jobs = c.d.d.call("query-block-jobs", json!({}));
        if jobs[0]["ready"] == json!(true) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never ready: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Ready: writes are mirrored into base as they come.
    for _ in 0..rounds / 2 {
        c.round();
    }
    c.d.d.call("block-job-complete", json!({"device": "c0"}));
    while c.d.d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the commit never ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = c.mark("commit complete");
    // The pivot made base durable with every write acknowledged before it.
    c.o.all_durable(done);
    // On base now.
    for _ in 0..rounds {
        c.round();
    }
    let oracle = std::mem::replace(&mut c.o, Oracle::new(Vec::new()));
    drop(c);
    let (t, points) = check_log(&log, &initial, &work, &oracle, done, false);
    println!(
        "crash states [daemon: NBD writes, active block-commit, pivot, writes on base; {points} durability points]: {t}"
    );
    assert_eq!(d.d.stop(), Some(0));
    assert!(t.clean(), "{t}");
    assert!(t.states >= 100, "only {} states", t.states);
}

/// A mirror through the daemon with the target recorded: client writes
/// before and while `blockdev-mirror` (sync full) copies the chain into a
/// fresh image, `block-job-complete` pivots the export onto the target,
/// writes go on there. Before the pivot a state of the target must only
/// pass `qemu-img check` and open; once the completion was reported, it is
/// the guest's disk: every write acknowledged before it, and every flushed
/// one after, reads back.
#[test]
fn crash_states_of_a_mirror_pivot_through_the_daemon() {
    let work = TempDir::new("crash-mirror");
    let p = |n: &str| work.join(n).to_str().unwrap().to_string();
    let (base, top, tgt, log) = (
        p("base.qcow2"),
        p("top.qcow2"),
        p("tgt.qcow2"),
        p("rec.log"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "8M"]);
    qemu_io(&["-c", "write -P 0x11 0 6M", &base]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(&[
        "-c",
        "write -P 0x31 1M 512k",
        "-c",
        "write -z 3M 256k",
        &top,
    ]);
    qemu_img(&["create", "-q", "-f", "qcow2", &tgt, "8M"]);
    let raw = p("before.raw");
    qemu_img(&["convert", "-O", "raw", &top, &raw]);
    let guest = std::fs::read(&raw).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tgt)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let initial = std::fs::read(&tgt).unwrap();

    let mut d = NbdDaemon::start(&["-m", "0x1"], &[]);
    d.d.call(
        "bdev_uring_create",
        json!({"name": "tgtfile", "filename": tgt, "direct": false}),
    );
    d.d.call(
        "bdev_record_create",
        json!({"name": "rec0", "base_bdev_name": "tgtfile", "log_path": log}),
    );
    d.d.call(
        "bdev_qcow2_open",
        json!({"node_name": "tgt0", "base_bdev": "rec0", "direct": false}),
    );
    d.d.open_qcow2_chain(
        "vd0",
        &[("base0", &base), ("top0", &top)],
        json!({"direct": false}),
    );
    d.export("vd0", true);
    let (nbd, size, _) = Raw::attach(&d.sock, "vd0", false, false);
    assert_eq!(size, SIZE);
    let mut c = Client {
        d: &mut d,
        nbd,
        o: Oracle::new(guest),
        cookie: 0,
        rng: 0x3c3c_a5a5,
    };
    let rounds = soak() as u64 * 40 + 8;
    for _ in 0..rounds {
        c.round();
    }
    c.d.d.call(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "vd0", "target": "tgt0", "sync": "full",
               "speed": 4 << 20}),
    );
    for _ in 0..rounds {
        c.round();
    }
    let t0 = Instant::now();
    loop {
        let jobs = c.d.d.call("query-block-jobs", json!({}));
        if jobs[0]["ready"] == json!(true) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never ready: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..rounds / 2 {
        c.round();
    }
    c.d.d.call("block-job-complete", json!({"device": "m0"}));
    while c.d.d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the mirror never ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = c.mark("mirror complete");
    // The pivot made the target durable with every write acknowledged before it.
    c.o.all_durable(done);
    for _ in 0..rounds {
        c.round();
    }
    let oracle = std::mem::replace(&mut c.o, Oracle::new(Vec::new()));
    drop(c);
    let (t, points) = check_log(&log, &initial, &work, &oracle, done, false);
    println!(
        "crash states [daemon: NBD writes, blockdev-mirror, pivot, writes on the target; {points} durability points]: {t}"
    );
    assert_eq!(d.d.stop(), Some(0));
    assert!(t.clean(), "{t}");
    assert!(t.states >= 100, "only {} states", t.states);
}

/// `bdev_record_*` refuse bad input with clear errors and leave nothing
/// behind: a missing base, a log path that cannot be created (the base is
/// not left claimed), a mark on a bdev that is no recorder, deleting a
/// recorder an image still uses, unknown parameters.
#[test]
fn bdev_record_refuses_bad_input() {
    let work = TempDir::new("crash-rpc");
    let mut d = NbdDaemon::start(&["-m", "0x1"], &[]);
    d.malloc("m0", 8);
    let log = work.join("r.log").to_str().unwrap().to_string();
    let e = d.d.call_err(
        "bdev_record_create",
        json!({"name": "r0", "base_bdev_name": "nope", "log_path": log}),
    );
    assert!(e["message"].as_str().unwrap().contains("nope"), "{e}");
    let e = d.d.call_err(
        "bdev_record_create",
        json!({"name": "r0", "base_bdev_name": "m0", "log_path": "/nonexistent/dir/r.log"}),
    );
    assert!(e["message"].as_str().unwrap().contains("record log"), "{e}");
    let e = d.d.call_err(
        "bdev_record_create",
        json!({"name": "r0", "base_bdev_name": "m0", "log_path": log, "bogus": 1}),
    );
    assert!(e["message"].as_str().unwrap().contains("bogus"), "{e}");
    // The failed creates left m0 unclaimed: a recorder over it now works.
    d.d.call(
        "bdev_record_create",
        json!({"name": "r0", "base_bdev_name": "m0", "log_path": log}),
    );
    let e =
        d.d.call_err("bdev_record_mark", json!({"name": "m0", "label": "x"}));
    assert!(
        e["message"].as_str().unwrap().contains("not a record bdev"),
        "{e}"
    );
    d.d.call(
        "bdev_qcow2_create",
        json!({"name": "q0", "base_bdev": "r0", "size": 4 << 20}),
    );
    let e = d.d.call_err("bdev_record_delete", json!({"name": "r0"}));
    assert!(e["message"].as_str().unwrap().contains("in use"), "{e}");
    let s1 =
        d.d.call("bdev_record_mark", json!({"name": "r0", "label": "a"}))["seq"]
            .as_u64()
            .unwrap();
    let s2 =
        d.d.call("bdev_record_mark", json!({"name": "r0", "label": "b"}))["seq"]
            .as_u64()
            .unwrap();
    assert!(s2 == s1 + 1 && s1 > 1, "{s1} {s2}");
    d.d.call("bdev_qcow2_delete", json!({"name": "q0"}));
    d.d.call("bdev_record_delete", json!({"name": "r0"}));
    // The log holds the image's creation, then the two marks, and parses.
    let l = Log::read(std::path::Path::new(&log)).expect("log");
    assert_eq!(l.mark("a"), Some(s1));
    assert!(l.events.len() as u64 >= s2);
    assert_eq!(d.d.stop(), Some(0));
}

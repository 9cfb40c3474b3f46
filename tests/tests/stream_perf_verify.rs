//! `sluice perf -s SOCK -w verify` on a device inside `sluice serve` while the
//! device streams (its backing chain copied into the top image, then the
//! backing dropped) and while it moves onto a malloc bdev (live block copy:
//! snapshot switch, then stream). Verify writes a pattern and reads it back;
//! nothing may be lost across the populate steps and the root switch. After
//! the jobs, the images are checked with `qemu-img` and every byte of the
//! device is accounted for: outside the verify range it equals the original
//! chain, inside it is the original or a sector verify wrote (its header holds
//! its own offset).

use serde_json::{json, Value};
use sluice_tests::{check, qemu_img, qemu_io, sluice_bin, Daemon, TempDir};
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The verify range: it spans base-only data (16M..40M) and overlay data at both ends.
const VOFF: u64 = 12 * MIB;
const VLEN: u64 = 32 * MIB;
/// Seconds of the verify run: long enough that the stream, slowed down by its
/// yielding to the workload (and by the other tests on a small machine), ends
/// within it.
const RUN_S: &str = "8";

/// base: 0x11 over 0..48M; top: 0x22 over 8M..16M and 0x33 over 40M..44M; 48M..64M unallocated.
fn make_chain(dir: &TempDir) -> (String, Vec<u8>) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "64M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x11 0 48M", b]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t, "64M",
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 8M 8M",
        "-c",
        "write -P 0x33 40M 4M",
        t,
    ]);
    let refp = dir.join("ref.raw");
    qemu_img(&["convert", "-O", "raw", t, refp.to_str().unwrap()]);
    let reference = std::fs::read(&refp).unwrap();
    assert_eq!(reference.len() as u64, 64 * MIB);
    (t.to_string(), reference)
}

/// Starts `sluice perf -s SOCK -w verify` on `drive0`'s verify range, two jobs.
fn spawn_verify(d: &Daemon, secs: &str) -> JoinHandle<Output> {
    let sock = d.rpc_sock.clone();
    let secs = secs.to_string();
    std::thread::spawn(move || {
        Command::new(sluice_bin())
            .args(["perf", "-s"])
            .arg(&sock)
            .args(["-w", "verify", "-T", "drive0", "-t", &secs, "-q", "16"])
            .args(["-m", "0x3", "--offset", "12m", "--length", "32m", "--json"])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run sluice perf -s")
    })
}

/// Asserts the perf run passed on both reactors and did I/O.
fn assert_verify_passed(out: Output) {
    let so = check(out, "sluice perf -s -w verify");
    let v: Value = serde_json::from_str(&so).unwrap_or_else(|e| panic!("not JSON ({e}): {so}"));
    assert_eq!(v["ok"], true, "{v}");
    let rs = v["results"].as_array().unwrap();
    assert_eq!(rs.len(), 2, "{v}");
    for r in rs {
        assert_eq!(r["job"], "drive0");
        assert_eq!(r["status"], "finished", "{r}");
        assert_eq!(r["io_failed"], 0, "{r}");
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
    }
}

fn job_events(d: &mut Daemon) -> Vec<Value> {
    d.call("x-query-job-events", json!({}))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until no block job is left; returns the BLOCK_JOB_COMPLETED data.
fn wait_stream_done(d: &mut Daemon) -> Value {
    let t0 = Instant::now();
    loop {
        let jobs = d.call("query-block-jobs", Value::Null);
        if jobs.as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "stream did not finish: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ev = job_events(d);
    let done = ev
        .iter()
        .find(|e| e["event"] == "BLOCK_JOB_COMPLETED")
        .unwrap_or_else(|| panic!("no BLOCK_JOB_COMPLETED in {ev:?}"));
    assert!(done["data"].get("error").is_none(), "stream failed: {done}");
    done["data"].clone()
}

/// Every byte of `got` is accounted for: outside the verify range it equals
/// the reference; inside, each 512-byte sector is the reference's or carries a
/// verify header naming its own offset. Returns the sectors verify wrote.
fn assert_content(got: &[u8], reference: &[u8]) -> usize {
    assert_eq!(got.len(), reference.len());
    let (lo, hi) = (VOFF as usize, (VOFF + VLEN) as usize);
    for (what, a, b) in [("before", 0, lo), ("after", hi, got.len())] {
        if let Some(i) = (a..b).find(|&i| got[i] != reference[i]) {
            panic!(
                "byte {i} ({what} the verify range) is {:#x}, the chain had {:#x}",
                got[i], reference[i]
            );
        }
    }
    let mut written = 0;
    for off in (lo..hi).step_by(512) {
        let s = &got[off..off + 512];
        if s == &reference[off..off + 512] {
            continue;
        }
        let hdr = u64::from_le_bytes(s[0..8].try_into().unwrap());
        let gen = u64::from_le_bytes(s[8..16].try_into().unwrap());
        assert!(
            hdr == off as u64 && gen > 0,
            "sector at {off} is neither the chain's data nor a verify pattern: header {hdr}, generation {gen}"
        );
        written += 1;
    }
    written
}

fn raw_of(src: &str, fmt: &str, dst: &Path) -> Vec<u8> {
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        src,
        dst.to_str().unwrap(),
    ]);
    std::fs::read(dst).unwrap()
}

/// Makes the chain in `dir` and a two-reactor daemon with its top opened as
/// `drive0`; returns the top's path, the reference contents and the daemon.
fn open_chain_in_daemon(dir: &TempDir) -> (String, Vec<u8>, Daemon) {
    let (top, reference) = make_chain(dir);
    let mut d = Daemon::start_with(&["-m", "0x3"], &[]);
    d.call(
        "bdev_qcow2_open",
        json!({"name": "drive0", "node_name": "top", "filename": top}),
    );
    (top, reference, d)
}

/// Waits for the stream job to finish, asserts it did so while the verify run
/// `perf` was still going (the `what` names the job in the message), then that
/// the verify run passed.
fn finish_under_verify(d: &mut Daemon, perf: JoinHandle<Output>, what: &str) {
    wait_stream_done(d);
    let overlapped = !perf.is_finished();
    let out = perf.join().unwrap();
    assert!(
        overlapped,
        "the {what} must complete while verify runs (make the run longer); perf: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_verify_passed(out);
}

#[test]
fn verify_workload_passes_during_a_stream_and_nothing_is_lost() {
    let dir = TempDir::new("spv");
    let (top, reference, mut d) = open_chain_in_daemon(&dir);
    // Slow enough that the verify job starts while the stream is at work.
    d.call(
        "block-stream",
        json!({"device": "drive0", "job-id": "s0", "speed": 4 * MIB}),
    );
    let perf = spawn_verify(&d, RUN_S);
    std::thread::sleep(Duration::from_millis(1500));
    let jobs = d.call("query-block-jobs", Value::Null);
    let j = &jobs[0];
    assert_eq!(j["device"], "s0", "{jobs}");
    let (off, len) = (j["offset"].as_u64().unwrap(), j["len"].as_u64().unwrap());
    assert!(off < len, "the stream must still be running: {j}");
    // Let it finish while verify still runs: the populate steps and the final
    // switch (backing dropped, device quiesced) happen under the workload.
    d.call("block-job-set-speed", json!({"device": "s0", "speed": 0}));
    finish_under_verify(&mut d, perf, "stream");
    let ins = &d.call("query-block", Value::Null)[0]["inserted"];
    assert_eq!(ins["backing_file_depth"], 0, "{ins}");
    d.call("bdev_qcow2_delete", json!({"name": "drive0"}));
    qemu_img(&["check", &top]);
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", &top])).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    let got = raw_of(&top, "qcow2", &dir.join("out.raw"));
    let written = assert_content(&got, &reference);
    assert!(written > 0, "verify wrote nothing in its range");
    d.stop();
}

#[test]
fn verify_workload_passes_during_a_live_copy_onto_malloc() {
    let dir = TempDir::new("spl");
    let (top, reference, mut d) = open_chain_in_daemon(&dir);
    d.call(
        "bdev_malloc_create",
        json!({"name": "Copy0", "num_blocks": (160 * MIB) / 512, "block_size": 512}),
    );
    let perf = spawn_verify(&d, RUN_S);
    std::thread::sleep(Duration::from_millis(700));
    // The device moves onto a new image on the malloc bdev under the workload...
    d.call(
        "blockdev-snapshot-sync",
        json!({"device": "drive0", "snapshot-file": "Copy0", "snapshot-node-name": "copy", "format": "qcow2"}),
    );
    let ins = &d.call("query-block", Value::Null)[0]["inserted"];
    assert_eq!(ins["node-name"], "copy", "{ins}");
    assert_eq!(ins["backing_file_depth"], 2, "{ins}");
    // ... and the chain is streamed into it.
    d.call("block-stream", json!({"device": "drive0", "job-id": "c0"}));
    finish_under_verify(&mut d, perf, "copy");
    let ins = &d.call("query-block", Value::Null)[0]["inserted"];
    assert_eq!(ins["node-name"], "copy", "{ins}");
    assert_eq!(ins["backing_file_depth"], 0, "{ins}");
    let names: Vec<String> = d
        .call("bdev_get_bdevs", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n == "top") && names.iter().any(|n| n == "Copy0"),
        "{names:?}"
    );
    // The old chain was released intact.
    qemu_img(&["check", &top]);
    // The device, now on Copy0 alone, read through NBD.
    let sock = dir.join("nbd.sock");
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": sock}}),
    );
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "exp0", "node-name": "drive0"}),
    );
    let uri = format!("nbd+unix:///drive0?socket={}", sock.display());
    let got = raw_of(&uri, "raw", &dir.join("out.raw"));
    let written = assert_content(&got, &reference);
    assert!(written > 0, "verify wrote nothing in its range");
    // A second verify run on the copied device passes too.
    assert_verify_passed(spawn_verify(&d, "0.5").join().unwrap());
    d.call("block-export-del", json!({"id": "exp0"}));
    d.call("nbd-server-stop", Value::Null);
    d.stop();
}

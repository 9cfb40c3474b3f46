//! Image locks and the commands that must not destroy a disk in use, end to
//! end through the real binary: sluice takes QEMU's OFD lock bytes, so
//! qemu-io, qemu-img and qemu-storage-daemon see its locks and it sees
//! theirs; snapshots onto an image of the device's own chain, creates over an
//! open image and `blockdev-create` of a file in use are refused before
//! anything is written, judged by `qemu-img check` / `compare` and the bytes.

mod nbd_common;

use nbd_common::NbdDaemon;
use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, run, Daemon, TempDir};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LOCKED: &str = "Failed to get \"write\" lock";
const SHARED_LOCKED: &str = "Failed to get shared \"write\" lock";

/// A 4 MiB qcow2 image at `p` with 1 MiB of 0x5a at 0; a byte copy at `p.ref`.
fn image(p: &Path) {
    let s = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s, "4M"]);
    qemu_io(&["-c", "write -P 0x5a 0 1M", s]);
    std::fs::copy(p, format!("{s}.ref")).unwrap();
}

/// The image is intact and holds what [`image`] wrote (checked once sluice
/// let it go). Bounded in time: `qemu-img check` of an image made its own
/// backing file never ends.
fn intact(p: &Path) {
    let s = p.to_str().unwrap();
    for args in [vec!["check", s], vec!["compare", &format!("{s}.ref"), s]] {
        let mut a = vec!["60", "qemu-img"];
        a.extend(args.iter().copied());
        sluice_tests::check(run("timeout", &a), &format!("qemu-img {}", args.join(" ")));
    }
}

/// Stops the daemon, failing if it panicked.
fn stop(mut d: Daemon) {
    let mut stderr = d.child.stderr.take().expect("daemon stderr");
    let code = d.stop();
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(!err.contains("panicked"), "the daemon panicked:\n{err}");
    assert_eq!(code, Some(0), "daemon exit status; stderr:\n{err}");
}

fn msg(e: &Value) -> String {
    e["message"].as_str().unwrap_or_default().to_string()
}

/// Runs one case of tests/py/image_locks.py against a fresh daemon, in a
/// scratch directory named `dir`; the case prints "ok" last when it passed.
fn py_case(dir: &str, case: &str) {
    let d = Daemon::start(&[]);
    let work = TempDir::new(dir);
    let out = sluice_tests::check(
        d.python(
            "image_locks.py",
            &["--dir", work.0.to_str().unwrap(), "--case", case],
        ),
        &format!("image_locks.py --case {case}"),
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
    stop(d);
}

/// A QEMU process holding `args`' image until killed.
struct Holder(Child);

impl Holder {
    /// `qemu-io ARGS -c 'sleep 60000'`: holds the image as qemu-io does.
    fn qemu_io(args: &[&str]) -> Holder {
        let mut c = Command::new("qemu-io");
        c.args(args).arg("-c").arg("sleep 60000");
        Self::spawn(c, args.last().unwrap())
    }

    /// qemu-storage-daemon with a qcow2 node over `file`.
    fn qsd(file: &str) -> Holder {
        let mut c = Command::new("qemu-storage-daemon");
        c.arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={file}"))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=q,file=f");
        Self::spawn(c, file)
    }

    fn spawn(mut c: Command, file: &str) -> Holder {
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a QEMU tool");
        let mut h = Holder(child);
        // Held once /proc/locks lists an OFD lock on the file (probing with
        // a QEMU tool would race the holder for the lock).
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(file).unwrap());
        let held = || {
            std::fs::read_to_string("/proc/locks")
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
        };
        let t0 = Instant::now();
        while !held() {
            if let Ok(Some(st)) = h.0.try_wait() {
                let mut err = String::new();
                let _ = h.0.stderr.take().unwrap().read_to_string(&mut err);
                let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
                panic!("{c:?} exited ({st}) before it locked {file}: {err}\n/proc/locks:\n{locks}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{c:?} never locked {file}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What QEMU's tools make of an image another process holds for writing:
/// (command, success, first line of stderr with the path as IMG). Ends with
/// `qemu-img create` over it, which must fail.
fn tool_outcomes(p: &str) -> Vec<(String, bool, String)> {
    let cmds: [&[&str]; 8] = [
        &["qemu-io", "-c", "read 0 512", p],
        &["qemu-io", "-r", "-c", "read 0 512", p],
        &["qemu-io", "-U", "-r", "-c", "read 0 512", p],
        &["qemu-img", "info", p],
        &["qemu-img", "info", "-U", p],
        &["qemu-img", "check", p],
        &["qemu-img", "check", "-U", p],
        &["qemu-img", "create", "-q", "-f", "qcow2", p, "1M"],
    ];
    cmds.iter()
        .map(|c| {
            let out = run(c[0], &c[1..]);
            let err = String::from_utf8_lossy(&out.stderr).replace(p, "IMG");
            let line = err.lines().next().unwrap_or_default().to_string();
            (c.join(" ").replace(p, "IMG"), out.status.success(), line)
        })
        .collect()
}

/// Polls `query-jobs` until job `id` concluded; returns it.
fn concluded(d: &mut Daemon, id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let jobs = d.call("query-jobs", Value::Null);
        if let Some(j) = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id && j["status"] == "concluded")
        {
            return j.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "job {id}: {jobs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `snapshot_blkdev` (2011) and `blockdev-snapshot-sync` onto the device's
/// own image, named by its path or another path to the same file, and onto
/// the image below it, are refused; every image stays as it was.
#[test]
fn snapshot_onto_own_chain_refused() {
    let w = TempDir::new("lsnap");
    let (base, top) = (w.join("base.qcow2"), w.join("top.qcow2"));
    image(&base);
    let (bs, ts) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", bs, "-F", "qcow2", ts]);
    qemu_io(&["-c", "write -P 0xa5 1M 1M", ts]);
    std::fs::copy(&top, w.join("top.qcow2.ref")).unwrap();
    let alias = w.join("alias.qcow2");
    std::os::unix::fs::symlink(&top, &alias).unwrap();
    let mut d = Daemon::start(&[]);
    d.call("bdev_qcow2_open", json!({"name": "d0", "filename": ts}));
    for target in [ts, alias.to_str().unwrap()] {
        let e = d.call_err(
            "snapshot_blkdev",
            json!({"device": "d0", "snapshot-file": target}),
        );
        assert!(msg(&e).contains("same filename as the backing file"), "{e}");
        let e = d.call_err(
            "blockdev-snapshot-sync",
            json!({"device": "d0", "snapshot-file": target, "format": "qcow2"}),
        );
        assert!(msg(&e).contains("same filename as the backing file"), "{e}");
    }
    let e = d.call_err(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": bs, "format": "qcow2"}),
    );
    assert!(msg(&e).contains("backing chain"), "{e}");
    // The device still reads its data.
    d.call("bdev_qcow2_delete", json!({"name": "d0"}));
    stop(d);
    intact(&top);
    intact(&base);
}

/// `bdev_qcow2_create` over the file of an open image, under another name
/// (a second writer) or the same one, is refused and the file keeps every
/// byte; refused arguments leave no file behind.
#[test]
fn qcow2_create_refuses_open_image_and_bad_arguments() {
    let w = TempDir::new("lcreate");
    let img = w.join("a.qcow2");
    image(&img);
    let s = img.to_str().unwrap();
    let mut d = Daemon::start(&[]);
    d.call("bdev_qcow2_open", json!({"name": "d0", "filename": s}));
    let before = std::fs::read(&img).unwrap();
    let e = d.call_err(
        "bdev_qcow2_create",
        json!({"name": "d1", "filename": s, "size": 1 << 20}),
    );
    assert!(msg(&e).contains(LOCKED), "{e}");
    assert!(
        msg(&e).contains("Is another process using the image"),
        "{e}"
    );
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    let e = d.call_err(
        "bdev_qcow2_create",
        json!({"name": "d0", "filename": s, "size": 1 << 20}),
    );
    assert!(msg(&e).contains("already exists"), "{e}");
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    // A second writable open of the file in the same process.
    let e = d.call_err("bdev_qcow2_open", json!({"name": "d2", "filename": s}));
    assert!(msg(&e).contains(LOCKED), "{e}");
    let e = d.call_err("bdev_uring_create", json!({"name": "u2", "filename": s}));
    assert!(msg(&e).contains(LOCKED), "{e}");
    // Arguments refused before any file is made.
    let new = w.join("new.qcow2");
    let n = new.to_str().unwrap();
    for bad in [
        json!({"name": "n1", "filename": n, "size": 1u64 << 40, "cluster_size": 1u64 << 30}),
        json!({"name": "n1", "filename": n, "size": 1 << 20, "cluster_size": 1000}),
        json!({"name": "n1", "filename": n, "size": 1 << 20, "backing_file": "missing.qcow2"}),
        json!({"name": "n1", "filename": n, "size": 1 << 20, "backing_file": s, "backing_format": "vmdk"}),
        json!({"name": "d0", "filename": n, "size": 1 << 20}),
        json!({"filename": n, "size": 1 << 20}),
    ] {
        let e = d.call_err("bdev_qcow2_create", bad.clone());
        assert!(!new.exists(), "{bad} left {n} behind ({e})");
    }
    let fifo = w.join("fifo");
    assert!(run("mkfifo", &[fifo.to_str().unwrap()]).status.success());
    let e = d.call_err(
        "bdev_qcow2_create",
        json!({"name": "n1", "filename": fifo.to_str().unwrap(), "size": 1 << 20}),
    );
    assert!(msg(&e).contains("is a FIFO, neither a regular file"), "{e}");
    d.call("bdev_qcow2_delete", json!({"name": "d0"}));
    // Deleted: the file is free again, here and for QEMU.
    d.call(
        "bdev_qcow2_create",
        json!({"name": "n1", "filename": n, "size": 1 << 20}),
    );
    d.call("bdev_qcow2_delete", json!({"name": "n1"}));
    qemu_img(&["check", n]);
    stop(d);
    intact(&img);
}

/// `blockdev-create` of a file over an open image: the job concludes with
/// QEMU's error (as qemu-storage-daemon's does) and the file keeps its length
/// and bytes; over a file qemu-io holds, the same.
#[test]
fn blockdev_create_file_refuses_file_in_use() {
    let w = TempDir::new("lbc");
    let img = w.join("a.qcow2");
    image(&img);
    let s = img.to_str().unwrap();
    let mut d = Daemon::start(&[]);
    d.call("bdev_qcow2_open", json!({"name": "d0", "filename": s}));
    let before = std::fs::read(&img).unwrap();
    d.call(
        "blockdev-create",
        json!({"job-id": "j0", "options": {"driver": "file", "filename": s, "size": 0}}),
    );
    let j = concluded(&mut d, "j0");
    assert_eq!(j["error"], LOCKED, "{j}");
    d.call("job-dismiss", json!({"id": "j0"}));
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    d.call("bdev_qcow2_delete", json!({"name": "d0"}));
    intact(&img);
    {
        let _q = Holder::qemu_io(&[s]);
        d.call(
            "blockdev-create",
            json!({"job-id": "j1", "options": {"driver": "file", "filename": s, "size": 0}}),
        );
        let j = concluded(&mut d, "j1");
        assert_eq!(j["error"], LOCKED, "{j}");
    }
    stop(d);
    intact(&img);
}

/// A QEMU process holding the image (qemu-io, qemu-storage-daemon): sluice's
/// opens fail with QEMU's error and touch nothing; `locking: off` opens anyway
/// (read-only); once the holder is gone the open works.
#[test]
fn qemu_holding_image_refuses_sluice() {
    let w = TempDir::new("lqemu");
    let img = w.join("a.qcow2");
    image(&img);
    let s = img.to_str().unwrap();
    let mut d = Daemon::start(&[]);
    let holders: [&dyn Fn() -> Holder; 2] = [&|| Holder::qemu_io(&[s]), &|| Holder::qsd(s)];
    for hold in holders {
        let holder = hold();
        let before = std::fs::read(&img).unwrap();
        let e = d.call_err("bdev_qcow2_open", json!({"name": "d0", "filename": s}));
        assert!(msg(&e).contains(LOCKED), "{e}");
        assert!(
            msg(&e).contains(&format!("Is another process using the image [{s}]?")),
            "{e}"
        );
        let e = d.call_err(
            "bdev_qcow2_open",
            json!({"name": "d0", "filename": s, "read_only": true}),
        );
        assert!(msg(&e).contains(SHARED_LOCKED), "{e}");
        let e = d.call_err("bdev_uring_create", json!({"name": "u0", "filename": s}));
        assert!(msg(&e).contains(LOCKED), "{e}");
        let e = d.call_err(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q0",
                   "file": {"driver": "file", "filename": s}}),
        );
        assert!(msg(&e).contains(LOCKED), "{e}");
        assert!(std::fs::read(&img).unwrap() == before, "the image changed");
        d.call(
            "bdev_uring_create",
            json!({"name": "u0", "filename": s, "readonly": true, "locking": "off"}),
        );
        d.call("bdev_uring_delete", json!({"name": "u0"}));
        d.call(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q0", "read-only": true,
                   "file": {"driver": "file", "filename": s, "locking": "off"}}),
        );
        d.call("blockdev-del", json!({"node-name": "q0"}));
        d.call(
            "bdev_qcow2_open",
            json!({"name": "d0", "filename": s, "read_only": true, "locking": "off"}),
        );
        // save_config keeps the choice.
        let cfg = d.call("save_config", Value::Null).to_string();
        assert!(cfg.contains(r#""locking":"off""#), "{cfg}");
        d.call("bdev_qcow2_delete", json!({"name": "d0"}));
        let e = d.call_err(
            "bdev_qcow2_open",
            json!({"name": "d0", "filename": s, "locking": "maybe"}),
        );
        assert!(msg(&e).contains("locking"), "{e}");
        drop(holder);
    }
    d.call("bdev_qcow2_open", json!({"name": "d0", "filename": s}));
    d.call("bdev_qcow2_delete", json!({"name": "d0"}));
    stop(d);
    intact(&img);
}

/// sluice holding the image: qemu-io and qemu-img check (without -U) and
/// qemu-storage-daemon are refused as they are by another QEMU; `qemu-img
/// info -U` works; qemu-io over NBD reads and writes through sluice.
#[test]
fn sluice_holding_image_refuses_qemu() {
    let w = TempDir::new("lsl");
    let img = w.join("a.qcow2");
    image(&img);
    let s = img.to_str().unwrap();
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.d.call("bdev_qcow2_open", json!({"node_name": "q0", "filename": s}));
    n.export("q0", true);
    let out = run("qemu-io", &["-c", "read 0 512", s]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(LOCKED), "{err}");
    assert!(
        err.contains(&format!("Is another process using the image [{s}]?")),
        "{err}"
    );
    let out = run("qemu-img", &["check", s]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(SHARED_LOCKED),
        "{err}"
    );
    qemu_img(&["info", "-U", s]);
    // Every QEMU tool fares as it does against qemu-storage-daemon holding a
    // copy of the image.
    let copy = w.join("b.qcow2");
    std::fs::copy(format!("{s}.ref"), &copy).unwrap();
    let c = copy.to_str().unwrap();
    let ours = tool_outcomes(s);
    let qsd = {
        let _h = Holder::qsd(c);
        tool_outcomes(c)
    };
    assert_eq!(
        ours, qsd,
        "sluice (left) and qemu-storage-daemon (right) holding the image"
    );
    assert!(ours.iter().filter(|o| !o.1).count() >= 5, "{ours:?}");
    let out = run(
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &format!("driver=file,node-name=f,filename={s}"),
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(LOCKED), "{err}");
    let uri = n.uri("q0");
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "write -P 0x33 2M 64k",
        &uri,
    ]);
    qemu_io(&["-f", "raw", "-c", "read -P 0x33 2M 64k", &uri]);
    n.d.call("block-export-del", json!({"id": "q0"}));
    n.wait_exports(|v| v.as_array().is_some_and(|a| a.is_empty()));
    n.d.call("bdev_qcow2_delete", json!({"name": "q0"}));
    // Closed: QEMU opens it again.
    qemu_io(&["-c", "read -P 0x33 2M 64k", s]);
    qemu_img(&["check", s]);
    let NbdDaemon { d, .. } = n;
    stop(d);
}

/// Over QMP (qemu.qmp, tests/py/image_locks.py): a snapshot onto the node's
/// own image, `blockdev-create` of its file, a second writer and a reader of
/// it are refused with the errors qemu-storage-daemon gives to the same
/// commands; the image reads back intact.
#[test]
fn qmp_refusals_match_qsd() {
    py_case("lqmp", "locks_qsd");
}

/// After `blockdev-snapshot-sync` the old top holds a backing file's lock
/// (bytes 100, 201, 203), as qemu-storage-daemon's does after the same
/// snapshot: `qemu-img info` and `qemu-io -r` read it, a new overlay over it
/// and a read-only image of it open, a writer does not; `force-share` is
/// refused without `read-only` and with it holds no "not shared" byte
/// (tests/py/image_locks.py compares every answer and /proc/locks with QSD's).
#[test]
fn snapshot_lowers_old_top_and_force_share_match_qsd() {
    py_case("lsnapqsd", "snapshot_qsd");
}

/// A stream into a backing file (the old top of a snapshot) and
/// `change-backing-file` of it take a writer's lock for the moment, as
/// qemu-storage-daemon reopens the node read-write: both are refused with
/// QSD's error while `qemu-io -r` reads the file, done without it, and the
/// file holds a reader's lock again afterwards (tests/py/image_locks.py
/// compares every answer and /proc/locks with QSD's; qemu-img judges the images).
#[test]
fn backing_file_writes_raise_lock_match_qsd() {
    py_case("lbackw", "backing_writes_qsd");
}

/// A device's snapshot (`snapshot_blkdev`, then `blockdev-snapshot-sync`)
/// leaves each old top holding a backing file's lock, as QEMU's does: QEMU's
/// tools fare as they do against qemu-storage-daemon after a snapshot
/// (`qemu-img info` and `qemu-io -r` work, a writer is refused) and a second
/// sluice opens a device whose backing file the old top is while the first
/// runs; before the snapshot all of that is refused.
#[test]
fn device_snapshot_old_top_readable() {
    let w = TempDir::new("ldevsnap");
    let top = w.join("top.qcow2");
    image(&top);
    let ts = top.to_str().unwrap();
    let (s1, s2) = (w.join("s1.qcow2"), w.join("s2.qcow2"));
    let mut d = Daemon::start(&[]);
    d.call("bdev_qcow2_open", json!({"name": "d0", "filename": ts}));
    let readable =
        |p: &str| -> Vec<(String, bool, String)> { tool_outcomes(p).into_iter().take(4).collect() };
    let held = readable(ts);
    let ok: Vec<bool> = held.iter().map(|x| x.1).collect();
    assert_eq!(ok, [false, false, true, false], "{held:?}");
    d.call(
        "snapshot_blkdev",
        json!({"device": "d0", "snapshot-file": s1.to_str().unwrap()}),
    );
    let lowered = |p: &str| {
        let o = readable(p);
        let ok: Vec<bool> = o.iter().map(|x| x.1).collect();
        // qemu-io (a writer) refused; qemu-io -r, -U -r and qemu-img info read.
        assert_eq!(ok, [false, true, true, true], "{o:?}");
        assert_eq!(o[0].2, format!("qemu-io: can't open device IMG: {LOCKED}"));
    };
    lowered(ts);
    // A second sluice: a device over a new overlay whose backing file is the
    // old top, reading its data.
    let o2 = w.join("o2.qcow2");
    let o2s = o2.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", ts, "-F", "qcow2", o2s]);
    let mut d2 = Daemon::start(&[]);
    d2.call("bdev_qcow2_open", json!({"name": "e0", "filename": o2s}));
    d.call(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": s2.to_str().unwrap(), "format": "qcow2"}),
    );
    lowered(s1.to_str().unwrap());
    lowered(ts);
    d2.call("bdev_qcow2_delete", json!({"name": "e0"}));
    stop(d2);
    qemu_io(&["-U", "-r", "-c", "read -P 0x5a 0 1M", o2s]);
    d.call("bdev_qcow2_delete", json!({"name": "d0"}));
    stop(d);
    intact(&top);
    qemu_img(&["check", s2.to_str().unwrap()]);
}

/// The number of OFD lock ranges on `p` (anyone's).
fn lock_ranges(p: &Path) -> usize {
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
        .count()
}

/// Closing an old top trims its file (the sparse growth a writable open
/// added), which resizes it: sluice takes the writer's lock back for that,
/// so while `qemu-io -r` reads the old top when sluice shuts down the file
/// is left as it is (a later writable open trims it), and without a reader
/// it is trimmed.
#[test]
fn old_top_trimmed_only_under_writer_lock() {
    let w = TempDir::new("ltrim");
    for (i, held) in [true, false].into_iter().enumerate() {
        let top = w.join(&format!("top{i}.qcow2"));
        image(&top);
        let ts = top.to_str().unwrap();
        let len0 = std::fs::metadata(&top).unwrap().len();
        let mut d = Daemon::start(&[]);
        d.call("bdev_qcow2_open", json!({"name": "d0", "filename": ts}));
        assert!(
            std::fs::metadata(&top).unwrap().len() > len0,
            "grown at open"
        );
        let s1 = w.join(&format!("s{i}.qcow2"));
        d.call(
            "snapshot_blkdev",
            json!({"device": "d0", "snapshot-file": s1.to_str().unwrap()}),
        );
        let before = lock_ranges(&top);
        let mut h = held.then(|| {
            let mut c = Command::new("qemu-io");
            c.args(["-r", "-c", "sleep 60000", ts])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c.spawn().expect("spawn qemu-io")
        });
        let t0 = Instant::now();
        while h.is_some() && lock_ranges(&top) <= before {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "qemu-io never locked"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Shutting down closes every image (flush, trim).
        stop(d);
        let len = std::fs::metadata(&top).unwrap().len();
        if let Some(c) = h.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(lock_ranges(&top), 0, "every lock ended");
        if held {
            assert!(len > len0, "trimmed under a reader: {len} <= {len0}");
        } else {
            assert_eq!(len, len0, "not trimmed");
        }
        intact(&top);
    }
}

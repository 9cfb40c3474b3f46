//! A writable qcow2 open extends the image file (sparsely) so the image can
//! grow; the file must come back to the image's end when the daemon stops
//! (QMP `quit`, SIGTERM, `spdk_kill_instance`), and an open after an unclean exit (SIGKILL) must
//! start from the image's end again instead of piling a new extension on the
//! old one. `qemu-img check` and the data written are verified after each run.

use serde_json::{json, Value};
use sluice_tests::{qemu_img, qemu_io, Daemon, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const VSIZE: u64 = 64 * MIB;
const CLUSTER: u64 = 65536;

/// What a writable open may add past the image's end (see `open_file`):
/// the virtual size, 1/32 of it, 16 MiB, rounded up to 1 MiB.
fn reserve() -> u64 {
    VSIZE + VSIZE / 32 + 16 * MIB + MIB
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// `qemu-img check` (must pass: no corruption, no leaks); returns the image end offset.
fn check_end(p: &Path) -> u64 {
    let out = qemu_img(&["check", "--output=json", p.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(v["check-errors"], 0, "{v}");
    v["image-end-offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no image end offset: {v}"))
}

/// The file ends where the image does (at most a cluster later).
fn assert_trimmed(p: &Path, what: &str) {
    let end = check_end(p);
    let len = file_len(p);
    assert!(
        len <= end + CLUSTER,
        "{what}: {} is {len} bytes long, the image ends at {end}",
        p.display()
    );
}

/// Starts NBD on the daemon and exports `node` (writable or not); returns its URI.
fn export(d: &mut Daemon, node: &str, writable: bool) -> String {
    let sock = d.dir.join("nbd.sock");
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": sock.to_str().unwrap()}}),
    );
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": node, "writable": writable}),
    );
    format!("nbd+unix:///{node}?socket={}", sock.display())
}

/// qemu-io commands against an NBD URI (qemu-io flushes before it exits).
fn nbd_io(uri: &str, read_only: bool, cmds: &[String]) {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    qemu_io(&args);
}

/// Reads back every `(pattern, offset, len)` from the image file.
fn verify(p: &Path, data: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = data
        .iter()
        .map(|(pat, off, len)| format!("read -P {pat:#x} {off} {len}"))
        .collect();
    let mut args = vec!["-r"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let path = p.to_str().unwrap().to_string();
    args.push(&path);
    qemu_io(&args);
}

/// Sends QMP `quit` (after negotiating).
fn qmp_quit(d: &mut Daemon) {
    if let Err(e) = try_qmp_quit(d) {
        // Say why: a daemon that died shows it on stderr.
        let st = d.child.try_wait().ok().flatten();
        let mut err = String::new();
        if st.is_some() {
            if let Some(s) = d.child.stderr.as_mut() {
                let _ = s.read_to_string(&mut err);
            }
        }
        panic!("QMP quit failed: {e} (daemon exit status {st:?}; stderr: {err})");
    }
}

fn try_qmp_quit(d: &Daemon) -> std::io::Result<()> {
    let s = UnixStream::connect(&d.qmp_sock)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    assert!(line.contains("QMP"), "greeting: {line}");
    for cmd in ["qmp_capabilities", "quit"] {
        w.write_all(format!("{}\n", json!({ "execute": cmd })).as_bytes())?;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            if v.get("event").is_none() {
                assert!(v.get("return").is_some(), "{cmd}: {v}");
                break;
            }
        }
    }
    Ok(())
}

/// Waits for the daemon to exit on its own; returns how long it took.
fn wait_exit(d: &mut Daemon) -> Duration {
    let t = Instant::now();
    loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sigterm(d: &Daemon) {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn quit_and_sigterm_trim_every_extended_image() {
    for how in ["quit", "SIGTERM", "spdk_kill_instance"] {
        let work = TempDir::new("qlen");
        let base = work.join("base.qcow2");
        let top = work.join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", b, &VSIZE.to_string()]);
        qemu_io(&["-c", "write -P 0x11 0 1M", b]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
        let (base_len, top_len) = (file_len(&base), file_len(&top));

        let mut d = Daemon::start(&[]);
        // The base is opened writable (as for a later stream or commit), the
        // top reads through it.
        d.call(
            "bdev_qcow2_open",
            json!({"node_name": "base0", "filename": b}),
        );
        d.call(
            "bdev_qcow2_open",
            json!({"name": "vd0", "filename": t, "backing": "base0"}),
        );
        assert!(
            file_len(&base) >= base_len + VSIZE && file_len(&top) >= top_len + VSIZE,
            "the writable opens extend the files ({} and {} bytes)",
            file_len(&base),
            file_len(&top)
        );
        let uri = export(&mut d, "vd0", true);
        nbd_io(
            &uri,
            false,
            &[
                "write -P 0x22 8M 4M".into(),
                "write -P 0x33 512k 64k".into(),
                "write -P 0x44 60M 100k".into(),
            ],
        );
        match how {
            "quit" => qmp_quit(&mut d),
            "SIGTERM" => sigterm(&d),
            _ => assert_eq!(
                d.call("spdk_kill_instance", json!({"sig_name": "SIGINT"})),
                true
            ),
        }
        let took = wait_exit(&mut d);
        assert!(
            took < Duration::from_secs(5),
            "{how}: stopping took {took:?}"
        );
        assert_trimmed(&base, how);
        assert_trimmed(&top, how);
        verify(
            &top,
            &[
                (0x11, 0, 512 << 10),
                (0x33, 512 << 10, 64 << 10),
                (0x11, 576 << 10, 448 << 10),
                (0, MIB, 7 * MIB),
                (0x22, 8 * MIB, 4 * MIB),
                (0x44, 60 * MIB, 100 << 10),
                (0, 60 * MIB + (100 << 10), 4 * MIB - (100 << 10)),
            ],
        );
        verify(&base, &[(0x11, 0, MIB), (0, MIB, VSIZE - MIB)]);
    }
}

#[test]
fn sigkill_then_reopen_does_not_pile_up_extensions() {
    let work = TempDir::new("qkill");
    let img = work.join("img.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, &VSIZE.to_string()]);
    qemu_io(&["-c", "write -P 0x10 0 1M", p]);
    let mut data = vec![(0x10u8, 0u64, MIB)];
    for round in 1..=3u64 {
        let end = check_end(&img);
        let mut d = Daemon::start(&[]);
        d.call("bdev_qcow2_open", json!({"name": "vd0", "filename": p}));
        let open_len = file_len(&img);
        assert!(
            open_len > end && open_len <= end + reserve(),
            "round {round}: open at image end {end} made the file {open_len} bytes long"
        );
        let uri = export(&mut d, "vd0", true);
        let w = (0x10 + round as u8, round * 8 * MIB, 3 * MIB);
        nbd_io(
            &uri,
            false,
            &[format!("write -P {:#x} {} {}", w.0, w.1, w.2)],
        );
        data.push(w);
        d.kill();
        // The file stays extended (no way around that), but by one reserve at most.
        let end = check_end(&img);
        let len = file_len(&img);
        assert!(
            len <= end + reserve(),
            "round {round}: after SIGKILL the file is {len} bytes, the image ends at {end}"
        );
        verify(&img, &data);
    }
    // A clean stop after all that brings the file back to the image's end.
    let mut d = Daemon::start(&[]);
    d.call("bdev_qcow2_open", json!({"name": "vd0", "filename": p}));
    assert_eq!(d.stop(), Some(0));
    assert_trimmed(&img, "after the SIGKILLs");
    verify(&img, &data);
}

#[test]
fn a_stale_tail_loses_its_holes_keeps_its_data_and_a_read_only_open_changes_nothing() {
    let work = TempDir::new("qtail");
    let img = work.join("img.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, &VSIZE.to_string()]);
    qemu_io(&["-c", "write -P 0x5a 0 2M", p]);
    let end = check_end(&img);
    // What a process that died with the image open may leave: a long file
    // with bytes past the image's end (clusters it used and freed again).
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(end + 300 * MIB).unwrap();
        f.write_all_at(&vec![0xab; 8 << 20], end).unwrap();
    }
    let stale = std::fs::metadata(&img).unwrap();

    // Read-only: the file is not touched, neither at open nor at exit.
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "filename": p, "read_only": true}),
    );
    let uri = export(&mut d, "vd0", false);
    nbd_io(&uri, true, &["read -P 0x5a 0 2M".into()]);
    assert_eq!(d.stop(), Some(0));
    let after = std::fs::metadata(&img).unwrap();
    assert_eq!(
        after.len(),
        stale.len(),
        "read-only open changed the length"
    );
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (stale.mtime(), stale.mtime_nsec()),
        "read-only open modified the file"
    );

    // Writable: the holes of the stale tail go before the file is extended;
    // the bytes past the image's end that the file holds stay (no refcount
    // accounts for them, but a corrupt image may still reference them), and
    // clusters allocated past them read as zeroes where nothing was written.
    let kept = (end + 8 * MIB).next_multiple_of(2 * MIB);
    let mut d = Daemon::start(&[]);
    d.call("bdev_qcow2_open", json!({"name": "vd0", "filename": p}));
    let open_len = file_len(&img);
    assert!(
        open_len <= kept + reserve(),
        "open of a file with a stale tail made it {open_len} bytes (image end {end})"
    );
    let mut tail = vec![0u8; 8 << 20];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut tail, end)
        .unwrap();
    assert!(
        tail.iter().all(|&b| b == 0xab),
        "the open cut off the bytes past the image's end"
    );
    let uri = export(&mut d, "vd0", true);
    nbd_io(
        &uri,
        false,
        &[
            "write -P 0xcd 32M 4k".into(),
            "write -P 0xce 40M 512".into(),
            "read -P 0 32772k 60k".into(),
        ],
    );
    qmp_quit(&mut d);
    wait_exit(&mut d);
    let len = file_len(&img);
    assert!(
        len >= end + 8 * MIB && len <= kept.max(check_end(&img)) + CLUSTER,
        "after the stale tail the file is {len} bytes (image end {end}, kept {kept})"
    );
    verify(
        &img,
        &[
            (0x5a, 0, 2 * MIB),
            (0, 2 * MIB, 30 * MIB),
            (0xcd, 32 * MIB, 4096),
            (0, 32 * MIB + 4096, 8 * MIB - 4096),
            (0xce, 40 * MIB, 512),
            (0, 40 * MIB + 512, 24 * MIB - 512),
        ],
    );
}

/// A full stream releases the images below the top: their files are trimmed
/// then and there, not left extended until the daemon stops.
#[test]
fn images_released_by_a_stream_are_trimmed() {
    let work = TempDir::new("qlen-stream");
    let base = work.join("base.qcow2");
    let mid = work.join("mid.qcow2");
    let top = work.join("top.qcow2");
    let (b, m, t) = (
        base.to_str().unwrap(),
        mid.to_str().unwrap(),
        top.to_str().unwrap(),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", b, &VSIZE.to_string()]);
    qemu_io(&["-c", "write -P 0x11 0 2M", b]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", m]);
    qemu_io(&["-c", "write -P 0x22 4M 2M", m]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", m, "-F", "qcow2", t]);
    let mut d = Daemon::start(&[]);
    d.open_qcow2_chain("vd0", &[("base0", b), ("mid0", m), ("top0", t)], json!({}));
    assert!(file_len(&mid) >= VSIZE, "the writable open extends mid");
    d.call("block-stream", json!({"job-id": "s0", "device": "vd0"}));
    let t0 = Instant::now();
    while d.call("query-block-jobs", json!({})) != json!([]) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the stream never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Released by the stream, while the daemon goes on.
    assert_trimmed(&base, "base after the stream");
    assert_trimmed(&mid, "mid after the stream");
    qmp_quit(&mut d);
    wait_exit(&mut d);
    assert_trimmed(&top, "top after quit");
    verify(
        &top,
        &[
            (0x11, 0, 2 * MIB),
            (0x22, 4 * MIB, 2 * MIB),
            (0, 6 * MIB, VSIZE - 6 * MIB),
        ],
    );
}

/// Clusters a discard frees give their space back to the file (a punched
/// hole) once the discard is flushed; the image stays valid and reads zeroes.
#[test]
fn discarded_clusters_are_punched_out_of_the_file() {
    let work = TempDir::new("qlen-discard");
    let img = work.join("img.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, &VSIZE.to_string()]);
    let allocated = || std::fs::metadata(&img).unwrap().blocks() * 512;
    let mut d = Daemon::start(&[]);
    d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "filename": p, "direct": false}),
    );
    let uri = export(&mut d, "vd0", true);
    nbd_io(&uri, false, &["write -P 0x42 0 16M".into()]);
    let full = allocated();
    assert!(full >= 16 * MIB, "16 MiB written, {full} bytes allocated");
    nbd_io(
        &uri,
        false,
        &["discard 0 12M".into(), "read -P 0 0 12M".into()],
    );
    let after = allocated();
    assert!(
        after + 11 * MIB <= full,
        "12 MiB discarded: {full} bytes allocated before, {after} after"
    );
    nbd_io(&uri, true, &["read -P 0x42 12M 4M".into()]);
    qmp_quit(&mut d);
    wait_exit(&mut d);
    check_end(&img);
    verify(&img, &[(0, 0, 12 * MIB), (0x42, 12 * MIB, 4 * MIB)]);
}

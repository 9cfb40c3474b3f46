//! FUA and write-through over NBD survive a SIGKILL of the daemon.
//!
//! A qcow2 image (with and without a backing file, buffered and O_DIRECT) is
//! opened, exported over NBD, and one 64 KiB write goes into a cluster the
//! image has not allocated: with the FUA flag (a raw NBD client, and
//! `qemu-io -c 'write -f'`), or without it through an export added with
//! `writethrough: true`. The daemon is killed the moment the reply arrives;
//! the image must then pass `qemu-img check` and read the data back (and the
//! backing file's data elsewhere). Before FUA was honoured by qcow2, the L2
//! entry mapping the new cluster was still only in the metadata cache, and
//! the data was lost. qemu-storage-daemon, killed the same way, is checked
//! for comparison.

mod nbd_common;

use nbd_common::{NbdDaemon, Raw, CMD_WRITE, ENOSPC, FLAG_FUA};
use serde_json::json;
use sluice_tests::{qemu_img, qemu_io, run, TempDir};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the write goes: a cluster no image of the chain allocated.
const OFF: u64 = 1 << 20;
const LEN: u32 = 64 << 10;
const PATTERN: u8 = 0x5a;

/// Makes `top.qcow2` (64 MiB), over `base.qcow2` (all 0x11) when `backing`.
fn image(work: &TempDir, backing: bool) -> String {
    let top = work.join("top.qcow2").to_str().unwrap().to_string();
    if backing {
        let base = work.join("base.qcow2").to_str().unwrap().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "64M"]);
        qemu_io(&["-c", "write -P 0x11 0 64M", &base]);
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
        ]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", &top, "64M"]);
    }
    top
}

/// A daemon with `top` open as device `vd0` and exported (writable).
fn serve(top: &str, direct: bool, writethrough: bool) -> NbdDaemon {
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "filename": top, "direct": direct}),
    );
    n.d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "vd0", "node-name": "vd0", "writable": true,
               "writethrough": writethrough}),
    );
    n
}

/// What must hold after the kill: a consistent image holding the write (and,
/// with a backing file, still reading the base's data around it).
fn check_image(top: &str, backing: bool, what: &str) {
    let out = run("qemu-img", &["check", top]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // 0: clean; 3: leaked clusters only (harmless). 2: corruption.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{what}: qemu-img check failed ({}):\n{text}",
        out.status
    );
    let read = format!("read -P {PATTERN:#x} {OFF} {LEN}");
    let out = run("qemu-io", &["-r", "-f", "qcow2", "-c", &read, top]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("verification failed"),
        "{what}: the acknowledged write is not in the image after the kill:\n{text}"
    );
    if backing {
        qemu_io(&["-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", top]);
        qemu_io(&["-r", "-f", "qcow2", "-c", "read -P 0x11 1088k 1M", top]);
    }
}

/// One NBD WRITE (`flags`) of the pattern with a raw client; waits for its
/// reply, which must be OK.
fn raw_write(n: &NbdDaemon, flags: u16) {
    let (mut c, size, _) = Raw::attach(&n.sock, "vd0", false, false);
    assert_eq!(size, 64 << 20);
    c.request(flags, CMD_WRITE, 7, OFF, LEN, &vec![PATTERN; LEN as usize]);
    let (err, cookie) = c.simple();
    assert_eq!((err, cookie), (0, 7), "the write failed");
}

/// Runs the qemu-io command `cmd` against `uri` and returns once it is done,
/// with qemu-io still connected (sleeping): its close, which would flush,
/// must not make the write durable in the test's place. Kills qemu-io on drop.
fn qemu_io_connected(uri: &str, cmd: &str) -> QemuIo {
    // Line-buffered, so the "wrote" line comes out while qemu-io sleeps.
    let mut c = Command::new("stdbuf")
        .args([
            "-oL",
            "qemu-io",
            "-f",
            "raw",
            "-c",
            cmd,
            "-c",
            "sleep 60000",
            uri,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-io");
    let out = c.stdout.take().expect("qemu-io stdout");
    let mut lines = BufReader::new(out).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    let q = QemuIo(c);
    assert!(
        first.starts_with("wrote "),
        "qemu-io {cmd:?} did not write: {first:?}"
    );
    q
}

/// A running qemu-io, killed when dropped.
struct QemuIo(std::process::Child);

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILLs the daemon at once; fails if it had panicked before.
fn kill(mut n: NbdDaemon) {
    let c = &mut n.d.child;
    let _ = c.kill();
    let _ = c.wait();
    let mut err = String::new();
    if let Some(e) = c.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!err.contains("panicked"), "the daemon panicked:\n{err}");
}

/// Whether O_DIRECT opens work in `dir` (not on tmpfs, for one).
fn direct_ok(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("probe");
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    r
}

fn fua_case(backing: bool, direct: bool) {
    let work = TempDir::new("fua");
    if direct && !direct_ok(&work.0) {
        println!("skipped: O_DIRECT is refused in {}", work.0.display());
        return;
    }
    let top = image(&work, backing);
    let n = serve(&top, direct, false);
    raw_write(&n, FLAG_FUA);
    kill(n);
    check_image(
        &top,
        backing,
        &format!("FUA write (backing {backing}, direct {direct})"),
    );
}

#[test]
fn fua_write_survives_kill_buffered() {
    fua_case(false, false);
}

#[test]
fn fua_write_survives_kill_buffered_with_backing() {
    fua_case(true, false);
}

#[test]
fn fua_write_survives_kill_direct() {
    fua_case(false, true);
}

#[test]
fn fua_write_survives_kill_direct_with_backing() {
    fua_case(true, true);
}

/// The same through a real client: `qemu-io -c 'write -f'` over NBD.
#[test]
fn qemu_io_fua_write_survives_kill() {
    let work = TempDir::new("fuaq");
    let top = image(&work, true);
    let n = serve(&top, false, false);
    let w = format!("write -f -P {PATTERN:#x} {OFF} {LEN}");
    let _client = qemu_io_connected(&n.uri("vd0"), &w);
    kill(n);
    check_image(&top, true, "qemu-io write -f");
}

/// An export added with `writethrough: true`: a plain write (no FUA) is
/// durable before its reply too.
#[test]
fn writethrough_export_write_survives_kill() {
    let work = TempDir::new("wt");
    let top = image(&work, true);
    let n = serve(&top, false, true);
    raw_write(&n, 0);
    kill(n);
    check_image(&top, true, "write-through export, plain write");
}

/// A write-through export also makes write-zeroes into a cluster that was
/// unallocated durable: through qemu-io (`write -z`, no FUA flag).
#[test]
fn writethrough_export_write_zeroes_survives_kill() {
    let work = TempDir::new("wtz");
    let top = image(&work, true);
    let n = serve(&top, false, true);
    let w = format!("write -z {OFF} {LEN}");
    let _client = qemu_io_connected(&n.uri("vd0"), &w);
    kill(n);
    qemu_io(&[
        "-r",
        "-f",
        "qcow2",
        "-c",
        &format!("read -P 0 {OFF} {LEN}"),
        &top,
    ]);
    qemu_io(&["-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", &top]);
}

/// The reference: qemu-storage-daemon keeps a FUA write across a SIGKILL.
#[test]
fn qsd_keeps_fua_write_across_kill() {
    if run("qemu-storage-daemon", &["--version"])
        .status
        .code()
        .is_none()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-storage-daemon is missing"
        );
        println!("skipped: qemu-storage-daemon is not installed");
        return;
    }
    let work = TempDir::new("fuaqsd");
    let top = image(&work, true);
    let sock = work.join("nbd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=qcow2,node-name=vd0,file.driver=file,file.filename={top}"
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=vd0,writable=on")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///vd0?socket={}", sock.display());
    let w = format!("write -f -P {PATTERN:#x} {OFF} {LEN}");
    let _client = qemu_io_connected(&uri, &w);
    let _ = qsd.kill();
    let _ = qsd.wait();
    check_image(&top, true, "qemu-storage-daemon, FUA write");
}

/// As in qemu-storage-daemon, write-through is an export's option, not a
/// node's: `blockdev-add` refuses `cache.writeback`, and the node under a
/// write-through export still reports `cache.writeback: true` (QSD's reply).
#[test]
fn writethrough_is_an_export_option_as_in_qsd() {
    let work = TempDir::new("wtq");
    let top = image(&work, false);
    let mut n = serve(&top, false, true);
    let e = n.d.call_err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "n1", "cache": {"writeback": false},
               "file": {"driver": "file", "filename": top}}),
    );
    assert!(
        e.to_string()
            .contains("Parameter 'cache.writeback' is unexpected"),
        "{e}"
    );
    let nodes = n.d.call("query-named-block-nodes", serde_json::Value::Null);
    let node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|v| v["node-name"] == "vd0-node"))
        .unwrap_or_else(|| panic!("no vd0-node in {nodes}"));
    assert_eq!(node["cache"]["writeback"], json!(true), "{node}");
    kill(n);
}

/// A FUA write whose metadata cannot be made durable (the L1 table write
/// fails with ENOSPC, injected by an error bdev under the image) is not
/// acknowledged: the client gets ENOSPC. The image keeps working: once the
/// error is used up, the same FUA write succeeds and survives a SIGKILL.
#[test]
fn fua_write_fails_when_its_metadata_cannot_be_written() {
    let work = TempDir::new("fuae");
    let top = image(&work, false);
    let mut hdr = [0u8; 48];
    std::fs::File::open(&top)
        .and_then(|mut f| f.read_exact(&mut hdr))
        .expect("read header");
    let l1 = u64::from_be_bytes(hdr[40..48].try_into().unwrap());
    // Room to grow: a bare uring bdev does not extend the file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&top)
        .and_then(|f| f.set_len(96 << 20))
        .expect("extend");
    let mut n = NbdDaemon::start(&["-m", "0x1"], &[]);
    n.d.call(
        "bdev_uring_create",
        json!({"name": "imgfile", "filename": top}),
    );
    n.d.call("bdev_error_create", json!({"base_name": "imgfile"}));
    n.d.call(
        "bdev_qcow2_open",
        json!({"name": "vd0", "node_name": "img", "base_bdev": "EE_imgfile", "no_backing": true}),
    );
    n.d.call(
        "bdev_error_inject_error",
        json!({"name": "EE_imgfile", "io_type": "write", "error_type": "enospc",
               "num": 1, "offset": l1, "length": 512}),
    );
    n.d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "vd0", "node-name": "vd0", "writable": true}),
    );
    let (mut c, _, _) = Raw::attach(&n.sock, "vd0", false, false);
    let data = vec![PATTERN; LEN as usize];
    c.request(FLAG_FUA, CMD_WRITE, 1, OFF, LEN, &data);
    assert_eq!(c.simple(), (ENOSPC, 1), "the FUA write was acknowledged");
    c.request(FLAG_FUA, CMD_WRITE, 2, OFF, LEN, &data);
    assert_eq!(c.simple(), (0, 2), "the FUA write failed with space back");
    kill(n);
    check_image(&top, false, "FUA write after an ENOSPC");
}

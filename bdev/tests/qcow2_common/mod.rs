//! Helpers shared by the qcow2 integration tests: a runtime, scratch
//! directories, qemu-img / qemu-io runners and whole-image reads through sluice.
#![allow(dead_code)]

use bdev::qcow2::{open_file, OpenOptions, Qcow2Bdev};
use bdev::{channel, read_at, write_at, Bdev, DmaBuf};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub mod crash_gen;

/// `n`, or 20 times `n` when `SLUICE_SOAK` is set (`scripts/test.sh`'s slow
/// soak run: more crash cycles, fuzz cases and write rounds).
pub fn soak(n: u64) -> u64 {
    match std::env::var("SLUICE_SOAK") {
        Ok(v) if !v.is_empty() && v != "0" => n * 20,
        _ => n,
    }
}

/// A runtime of `n` unpinned reactors.
pub fn runtime(n: usize) -> Runtime {
    let list = (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let mut cfg = RuntimeConfig::new(CoreSet::from_list(&list).expect("cores"));
    cfg.pin = false;
    Runtime::start(cfg).expect("runtime")
}

/// A fresh scratch directory.
pub fn scratch(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "qcow2-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command; returns (exit code, stdout + stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img create -q -f qcow2 EXTRA.. PATH SIZE`, asserting success.
pub fn qemu_img_create(path: impl AsRef<Path>, size: &str, extra: &[&str]) {
    let p = path.as_ref().to_str().expect("utf8 path");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[p, size]);
    run("qemu-img", &args);
}

/// qemu-io commands on an image (`-f qcow2`).
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = path.to_str().expect("utf8 path");
    args.push(p);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
}

/// The guest-visible contents as qemu-img sees them.
pub fn qemu_contents(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("qemu.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let d = std::fs::read(&raw).expect("read raw");
    let _ = std::fs::remove_file(&raw);
    d
}

/// `qemu-img check -U` exit code and output (`-U`: the image may still be
/// open here, holding its lock, as with any QEMU process).
pub fn qemu_check(path: &Path) -> (i32, String) {
    run_status("qemu-img", &["check", "-U", path.to_str().unwrap()])
}

/// Opens an image file through sluice on reactor 0.
pub fn open(
    rt: &RuntimeHandle,
    name: &str,
    path: &Path,
    opts: OpenOptions,
) -> Result<Arc<Qcow2Bdev>, bdev::BdevError> {
    let (n, p) = (name.to_string(), path.to_path_buf());
    rt.spawn_on(0, move || async move { open_file(&n, &p, opts).await })
        .block()
        .expect("join")
}

/// Reads the whole bdev through its channel on reactor `r`, in `chunk`-byte requests.
pub fn read_all(rt: &RuntimeHandle, r: usize, b: &Arc<dyn Bdev>, chunk: usize) -> Vec<u8> {
    let b = b.clone();
    rt.spawn_on(r, move || async move {
        let ch = channel(&b).expect("channel");
        let size = b.size();
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0u64;
        while off < size {
            let n = (chunk as u64).min(size - off) as usize;
            let buf = read_at(&ch, off, n)
                .await
                .unwrap_or_else(|e| panic!("read at {off}: {e}"));
            out.extend_from_slice(buf.as_slice());
            off += n as u64;
        }
        out
    })
    .block()
    .expect("join")
}

/// Writes `data` at `off` through reactor `r`.
pub fn write(rt: &RuntimeHandle, r: usize, b: &Arc<dyn Bdev>, off: u64, data: Vec<u8>) {
    let b = b.clone();
    rt.spawn_on(r, move || async move {
        let ch = channel(&b).expect("channel");
        write_at(&ch, off, DmaBuf::from_slice(&data).expect("buf"))
            .await
            .unwrap_or_else(|e| panic!("write at {off}: {e}"));
    })
    .block()
    .expect("join")
}

/// Flushes (and trims) an image.
pub fn close(rt: &RuntimeHandle, q: &Arc<Qcow2Bdev>) {
    let q = q.clone();
    rt.spawn_on(0, move || async move { q.close().await })
        .block()
        .expect("join")
        .expect("close");
}

/// A deterministic pseudo-random generator (xorshift).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Plain options with O_DIRECT off (scratch dirs may be on any filesystem).
pub fn opts() -> OpenOptions {
    OpenOptions {
        direct: false,
        ..OpenOptions::default()
    }
}

//! Helpers for the end-to-end tests: find the `sluice` binary, start a daemon on
//! private sockets, talk JSON-RPC to it, run the Python clients from the venv.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod vm;
pub use vm::{run_guest, vm_profile, GuestRun, VM_SKIP};

/// Whether this is the slow soak run (`SLUICE_SOAK=1 scripts/test.sh`):
/// tests then repeat their crash and kill rounds many more times.
pub fn soak() -> bool {
    std::env::var("SLUICE_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Path of the `sluice` binary: `$SLUICE_BIN`, else the one of the profile the
/// tests were built with (target/debug/sluice under `cargo test`), which
/// `scripts/test.sh` builds before the tests run.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let p = target.join(profile).join("sluice");
    assert!(
        p.exists(),
        "{} not built: run `cargo build --bins` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The Python interpreter of the test venv (`.venv`, made by scripts/test.sh).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_PYTHON") {
        return PathBuf::from(p);
    }
    workspace_root().join(".venv/bin/python")
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    /// Creates `/tmp/sluice-test-<pid>-<n>-<tag>` (short: Unix socket paths are limited to 108 bytes).
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/sl-{}-{}-{}", std::process::id(), n, tag));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `sluice serve` on private sockets.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its runtime directory.
    pub dir: TempDir,
    /// JSON-RPC socket.
    pub rpc_sock: PathBuf,
    /// QMP socket.
    pub qmp_sock: PathBuf,
    next_id: u64,
}

impl Daemon {
    /// Starts `sluice serve --runtime-dir DIR --no-pin -m 0x1 EXTRA...` and waits for its RPC socket.
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_with(&["-m", "0x1"], extra)
    }

    /// Like [`Daemon::start`] with explicit core arguments.
    pub fn start_with(cores: &[&str], extra: &[&str]) -> Daemon {
        let dir = TempDir::new("d");
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("serve")
            .arg("--runtime-dir")
            .arg(&dir.0)
            .arg("--no-pin")
            .args(cores)
            .args(extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var("RUST_LOG").is_err() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd.spawn().expect("spawn sluice");
        let rpc_sock = dir.join("sluice.sock");
        let qmp_sock = dir.join("sluice-qmp.sock");
        let mut d = Daemon {
            child,
            dir,
            rpc_sock,
            qmp_sock,
            next_id: 1,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(e) = self.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("sluice exited early with {st}: {err}");
            }
            if UnixStream::connect(&self.rpc_sock).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "sluice did not open {} within 20 s",
            self.rpc_sock.display()
        );
    }

    /// Calls a JSON-RPC method; returns the whole reply object.
    pub fn call_raw(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            req["params"] = params;
        }
        let mut s = UnixStream::connect(&self.rpc_sock).expect("connect rpc socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        s.write_all(req.to_string().as_bytes()).expect("send");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    /// Calls a method and returns `result`, panicking on an error reply.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let r = self.call_raw(method, params);
        if let Some(e) = r.get("error") {
            panic!("{method} failed: {e}");
        }
        r["result"].clone()
    }

    /// Calls a method that must fail; returns the `error` object.
    pub fn call_err(&mut self, method: &str, params: Value) -> Value {
        let r = self.call_raw(method, params);
        r.get("error")
            .cloned()
            .unwrap_or_else(|| panic!("{method} unexpectedly succeeded: {r}"))
    }

    /// Opens a qcow2 chain bottom first: `chain` is `(node name, file)` pairs,
    /// each image backed by the one before it (the first by none); the last
    /// becomes device `device`. `extra` (an object) is added to every open.
    pub fn open_qcow2_chain(&mut self, device: &str, chain: &[(&str, &str)], extra: Value) {
        let mut below: Option<&str> = None;
        for (i, (node, file)) in chain.iter().enumerate() {
            let mut p = serde_json::json!({"node_name": node, "filename": file});
            if let Some(b) = below {
                p["backing"] = Value::from(b);
            }
            if i + 1 == chain.len() {
                p["name"] = Value::from(device);
            }
            if let (Some(o), Some(e)) = (p.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            self.call("bdev_qcow2_open", p);
            below = Some(node);
        }
    }

    /// Runs `sluice rpc -s SOCK ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(sluice_bin())
            .arg("rpc")
            .arg("-s")
            .arg(&self.rpc_sock)
            .args(args)
            .output()
            .expect("run sluice rpc")
    }

    /// Runs a Python script from tests/py with the venv interpreter; the
    /// sockets are passed as `--rpc SOCK --qmp SOCK` before `args`.
    pub fn python(&self, script: &str, args: &[&str]) -> Output {
        let path = workspace_root().join("tests/py").join(script);
        Command::new(python())
            .arg(path)
            .arg("--rpc")
            .arg(&self.rpc_sock)
            .arg("--qmp")
            .arg(&self.qmp_sock)
            .args(args)
            .output()
            .expect("run python")
    }

    /// Sends SIGTERM and waits; returns the exit status code.
    pub fn stop(mut self) -> Option<i32> {
        let pid = self.child.id() as i32;
        send_signal(pid, libc::SIGTERM);
        let st = self.child.wait().ok()?;
        st.code()
    }

    /// Runs `tests/py/SCRIPT --dir <a fresh temp dir> --case CASE` against
    /// this daemon; fails the test unless the script exits 0 and prints
    /// "ok" last. Returns its stdout.
    pub fn run_case(&self, script: &str, case: &str) -> String {
        let work = TempDir::new(case);
        let out = check(
            self.python(script, &["--dir", work.0.to_str().unwrap(), "--case", case]),
            &format!("{script} --case {case}"),
        );
        assert!(out.trim_end().ends_with("ok"), "{out}");
        out
    }

    /// SIGKILLs the daemon.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn send_signal(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Daemon {
    /// Ends the daemon and fails the test if it panicked, even where a
    /// handler caught the panic and the daemon went on (a test that took
    /// the daemon's stderr checks it itself).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let mut err = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        if err.contains("panicked") && !std::thread::panicking() {
            panic!("the daemon panicked:\n{err}");
        }
    }
}

/// Asserts a command succeeded, printing its output otherwise; returns stdout.
pub fn check(out: Output, what: &str) -> String {
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    let se = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{so}\nstderr:\n{se}",
        out.status
    );
    so
}

/// Runs a command and returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

/// Runs `qemu-img ARGS` and asserts success; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    check(
        run("qemu-img", args),
        &format!("qemu-img {}", args.join(" ")),
    )
}

/// Runs `qemu-io ARGS` and asserts success; returns stdout.
pub fn qemu_io(args: &[&str]) -> String {
    let out = check(run("qemu-io", args), &format!("qemu-io {}", args.join(" ")));
    assert!(
        !out.contains("Pattern verification failed"),
        "qemu-io verification failed:\n{out}"
    );
    out
}

/// Whether a path exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

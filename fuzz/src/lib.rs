//! What the fuzz targets that need reactors share: one runtime for the
//! process (started at the first input, never stopped: libFuzzer runs
//! inputs until it exits), a scratch directory and a bound on every wait,
//! so that a hang is a crash libFuzzer reports rather than a stall.

use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Longest a step of one input may take before it counts as a hang.
pub const HANG: Duration = Duration::from_secs(5);

/// The process's runtime: one reactor, unpinned.
pub fn rt() -> RuntimeHandle {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").expect("cores"));
        cfg.pin = false;
        Runtime::start(cfg).expect("runtime")
    })
    .handle()
}

/// Runs `f` on the reactor and waits for its result, at most [`HANG`].
pub fn on_reactor<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let _ = rt().spawn_on(0, move || async move {
        let _ = tx.send(f().await);
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|e| panic!("the reactor did not finish the input within {HANG:?}: {e}"))
}

/// A scratch directory of this process (for sockets). libFuzzer ends the
/// process with `exit`, so nothing removes it then: each new one first
/// removes those of fuzzing processes that are gone.
pub fn scratch() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name();
                let pid = name.to_str().and_then(|n| n.strip_prefix("sluice-fuzz-"));
                if pid.is_some_and(|pid| {
                    pid.parse::<u32>().is_ok()
                        && !std::path::Path::new("/proc").join(pid).exists()
                }) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let p = tmp.join(format!("sluice-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    })
    .clone()
}

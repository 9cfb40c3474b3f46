//! The daemon raises its soft limit on open files to the hard limit at start
//! (as QEMU and many daemons do): every open image holds descriptors, and a
//! soft limit of 1,024 would cap the devices far below what the hard limit
//! allows. Where the hard limit is unlimited, the kernel's own ceiling
//! (`fs.nr_open`) is used. Not being able to is not fatal: the daemon runs
//! with the limit it has (logged at debug level either way).

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// The kernel's most open files per process (`fs.nr_open`).
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_limit() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "open file limit unknown; left as it is");
            return;
        }
    };
    let target = if hard == RLIM_INFINITY {
        nr_open().unwrap_or(soft).max(soft)
    } else {
        hard
    };
    if soft >= target {
        tracing::debug!(soft, hard, "open file limit already at the hard limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => tracing::debug!(from = soft, to = target, "open file limit raised"),
        Err(e) => tracing::debug!(error = %e, soft, hard, "open file limit not raised"),
    }
}

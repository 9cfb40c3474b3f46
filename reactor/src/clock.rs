//! A cheap monotonic tick counter (the TSC on x86_64) and its rate, and the
//! calling thread's CPU time (a system call: what the reactor's busy time
//! counts, see `reactor.rs`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();
static HZ: OnceLock<u64> = OnceLock::new();

/// Current tick count. On x86_64 this is the invariant TSC (a few ns to read);
/// elsewhere nanoseconds since the first call.
#[inline(always)]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // `_rdtsc` has no preconditions; it only reads the time-stamp counter.
        #[allow(unused_unsafe)]
        // SAFETY: rdtsc is available on every x86_64 CPU and has no memory effects.
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per second, calibrated once (about 20 ms on first call).
pub fn ticks_hz() -> u64 {
    *HZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let _ = EPOCH.get_or_init(Instant::now);
            let t0 = Instant::now();
            let c0 = ticks();
            std::thread::sleep(Duration::from_millis(20));
            let c1 = ticks();
            let dt = t0.elapsed();
            ((c1 - c0) as u128 * 1_000_000_000 / dt.as_nanos().max(1)) as u64
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            1_000_000_000
        }
    })
}

/// Converts a tick delta to nanoseconds.
#[inline]
pub fn ticks_to_ns(t: u64) -> u64 {
    (t as u128 * 1_000_000_000 / ticks_hz() as u128) as u64
}

/// Converts a duration to ticks.
#[inline]
pub(crate) fn duration_to_ticks(d: Duration) -> u64 {
    (d.as_nanos() * ticks_hz() as u128 / 1_000_000_000) as u64
}

/// The CPU time the calling thread has run so far, in nanoseconds
/// (`CLOCK_THREAD_CPUTIME_ID`: a system call, not the vDSO, so about a
/// hundred nanoseconds or more); `None` where that clock is unavailable.
#[inline]
pub(crate) fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Converts nanoseconds to ticks.
#[inline]
pub(crate) fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * ticks_hz() as u128 / 1_000_000_000) as u64
}

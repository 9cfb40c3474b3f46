//! A cheap monotonic tick counter (the TSC on x86_64) and its rate.

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

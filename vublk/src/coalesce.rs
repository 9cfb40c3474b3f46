//! Interrupt coalescing of the used-ring signal, as SPDK's vhost target does it
//! (`vhost_controller_set_coalescing`): per virtqueue, the requests completed
//! in each 10 ms window are counted; when a window's count is above
//! `iops_threshold` (scaled to the window), the next signals are spaced at
//! least `delay_base_us * (count - threshold) / threshold` apart, so one call
//! eventfd write covers many completions and the guest submits bigger batches.
//!
//! The contract:
//! - `delay_base_us == 0` (SPDK's default, with `iops_threshold` 60000) turns
//!   it off: every poll that completed something signals, as without it.
//! - A signal held back is never lost: [`Coalescer::due`] says when it may go,
//!   and the queue's poller keeps its reactor awake and fires it at the first
//!   iteration after that (`crate::vring`). Stopping a ring fires it at once.
//! - Settings change live (the RPC stores them in [`Coalescing`]); a queue
//!   picks them up at its next window.
//! - One departure from SPDK: there, a window at or below the threshold leaves
//!   the previous delay in force and its count accumulating into the next
//!   window, so a queue well below the threshold is still delayed every few
//!   windows. Here each window stands alone: at or below the threshold the
//!   delay is zero (the rate measured is the rate the guest sees).

use std::sync::atomic::{AtomicU32, Ordering};

/// SPDK's `SPDK_VHOST_STATS_CHECK_INTERVAL_MS`: the measuring window.
pub const WINDOW_MS: u64 = 10;
/// SPDK's `SPDK_VHOST_COALESCING_DELAY_BASE_US`: off.
pub const DEFAULT_DELAY_BASE_US: u32 = 0;
/// SPDK's `SPDK_VHOST_VQ_IOPS_COALESCING_THRESHOLD`.
pub const DEFAULT_IOPS_THRESHOLD: u32 = 60_000;

/// An export's coalescing settings, shared with its queues.
#[derive(Debug)]
pub struct Coalescing {
    delay_base_us: AtomicU32,
    iops_threshold: AtomicU32,
}

impl Default for Coalescing {
    fn default() -> Self {
        Self {
            delay_base_us: AtomicU32::new(DEFAULT_DELAY_BASE_US),
            iops_threshold: AtomicU32::new(DEFAULT_IOPS_THRESHOLD),
        }
    }
}

impl Coalescing {
    /// Sets both, after checking them as SPDK does: the threshold must leave at
    /// least one request per window (100 IOPS), the delay must be under 2^32
    /// ticks of the reactors' clock (about 1.4 s at 3 GHz).
    pub fn set(&self, delay_base_us: u32, iops_threshold: u32) -> Result<(), String> {
        if window_threshold(iops_threshold) == 0 {
            return Err(format!(
                "IOPS rate of {iops_threshold} is too low. Min is {}",
                1000 / WINDOW_MS
            ));
        }
        let ticks = u128::from(delay_base_us) * u128::from(reactor::ticks_hz()) / 1_000_000;
        if ticks >= u128::from(u32::MAX) {
            return Err(format!("Delay time of {delay_base_us} is too big"));
        }
        self.delay_base_us.store(delay_base_us, Ordering::Relaxed);
        self.iops_threshold.store(iops_threshold, Ordering::Relaxed);
        Ok(())
    }

    /// `(delay_base_us, iops_threshold)`.
    pub fn get(&self) -> (u32, u32) {
        (
            self.delay_base_us.load(Ordering::Relaxed),
            self.iops_threshold.load(Ordering::Relaxed),
        )
    }
}

fn window_threshold(iops: u32) -> u64 {
    u64::from(iops) * WINDOW_MS / 1000
}

/// One queue's coalescing state, in ticks of the caller's clock.
#[derive(Debug)]
pub struct Coalescer {
    hz: u64,
    window: u64,
    /// Settings as of the current window: delay base in ticks, and the
    /// threshold in requests per window. Zero base: off.
    base: u64,
    threshold: u64,
    window_end: u64,
    count: u64,
    delay: u64,
    next_event: u64,
}

impl Coalescer {
    /// A queue's state with a clock of `hz` ticks per second, starting at `now`.
    pub fn new(hz: u64, cfg: &Coalescing, now: u64) -> Self {
        let mut c = Self {
            hz: hz.max(1),
            window: (hz.max(1) * WINDOW_MS / 1000).max(1),
            base: 0,
            threshold: 1,
            window_end: now,
            count: 0,
            delay: 0,
            next_event: 0,
        };
        c.load(cfg);
        c.window_end = now + c.window;
        c
    }

    fn load(&mut self, cfg: &Coalescing) {
        let (base_us, iops) = cfg.get();
        self.base = u64::from(base_us) * self.hz / 1_000_000;
        self.threshold = window_threshold(iops).max(1);
        if self.base == 0 {
            self.delay = 0;
            self.next_event = 0;
        }
    }

    /// Whether coalescing is on (as of the current window).
    pub fn enabled(&self) -> bool {
        self.base != 0
    }

    /// Counts `n` requests completed.
    pub fn completed(&mut self, n: u64) {
        self.count += n;
    }

    /// Whether a signal may go at `now`; closes the measuring window (and
    /// reloads the settings) when it has passed.
    pub fn due(&mut self, cfg: &Coalescing, now: u64) -> bool {
        if now >= self.window_end {
            self.load(cfg);
            self.delay = if self.base != 0 && self.count > self.threshold {
                self.base.saturating_mul(self.count - self.threshold) / self.threshold
            } else {
                0
            };
            self.count = 0;
            self.window_end = now + self.window;
            // A new delay starts from now, as SPDK's does.
            self.next_event = self.next_event.min(now);
        }
        now >= self.next_event
    }

    /// Records a signal sent at `now`.
    pub fn signalled(&mut self, now: u64) {
        self.next_event = now.saturating_add(self.delay);
    }

    /// The current delay between signals, in ticks.
    pub fn delay(&self) -> u64 {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 1_000_000; // a tick per microsecond

    #[test]
    fn spdk_defaults_are_off_and_low_thresholds_are_refused() {
        let cfg = Coalescing::default();
        assert_eq!(cfg.get(), (0, 60_000));
        let mut c = Coalescer::new(HZ, &cfg, 0);
        assert!(!c.enabled());
        // However fast the queue runs, every signal may go.
        for t in 0..100_000u64 {
            c.completed(10);
            assert!(c.due(&cfg, t));
            c.signalled(t);
        }
        assert!(cfg.set(50, 99).is_err(), "below one request per window");
        assert!(cfg.set(2_000_000_000, 60_000).is_err(), "delay too big");
        assert_eq!(cfg.get(), (0, 60_000), "a refused setting changes nothing");
        cfg.set(50, 100).expect("the minimum threshold");
    }

    #[test]
    fn above_the_threshold_signals_are_spaced_by_spdks_formula() {
        let cfg = Coalescing::default();
        cfg.set(100, 10_000).expect("set"); // 100 requests per 10 ms window
        let mut c = Coalescer::new(HZ, &cfg, 0);
        // Window 1: 300 requests (3x the threshold), signalled freely.
        for t in 0..300u64 {
            c.completed(1);
            assert!(c.due(&cfg, t * 10));
            c.signalled(t * 10);
        }
        // The window closes at 10 ms: delay = 100 us * (300 - 100) / 100.
        assert!(c.due(&cfg, 10_000));
        assert_eq!(c.delay(), 200);
        c.signalled(10_000);
        assert!(!c.due(&cfg, 10_100), "held back within the delay");
        assert!(!c.due(&cfg, 10_199));
        assert!(c.due(&cfg, 10_200), "due once the delay has passed");
        c.signalled(10_200);
        // A quiet window (at the threshold) turns the delay off again.
        c.completed(100);
        assert!(c.due(&cfg, 20_000));
        assert_eq!(c.delay(), 0);
        c.signalled(20_000);
        assert!(c.due(&cfg, 20_001));
    }

    #[test]
    fn turning_it_off_releases_a_held_signal_at_the_next_window() {
        let cfg = Coalescing::default();
        cfg.set(1_000_000, 100).expect("set"); // a huge delay
        let mut c = Coalescer::new(HZ, &cfg, 0);
        c.completed(50);
        assert!(c.due(&cfg, 10_000));
        c.signalled(10_000);
        assert!(!c.due(&cfg, 10_001));
        cfg.set(0, 60_000).expect("off");
        assert!(c.due(&cfg, 20_000), "off from the next window on");
        assert!(!c.enabled());
    }
}

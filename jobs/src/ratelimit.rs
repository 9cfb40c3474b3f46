//! A token-bucket rate limit for block jobs (`speed` in bytes per second).
//!
//! Tokens accrue at `speed` bytes per second up to a burst of one slice
//! (100 ms) worth. A request of `n` bytes may start once the bucket holds
//! `min(n, burst)` tokens; it then takes `n` (the bucket may go into debt for
//! requests larger than the burst, which later requests pay back). So the bytes
//! started by time `t` never exceed `burst + speed * t`: no overshoot. Changing
//! the speed keeps the tokens already earned (capped at the new burst) and takes
//! effect for the very next request.

/// Nanoseconds per second.
const NS: u128 = 1_000_000_000;

/// The burst window.
pub const SLICE_NS: u64 = 100_000_000;

/// A token bucket driven by an explicit clock (nanoseconds), so it is testable.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    speed: u64,
    /// Tokens in bytes; negative while in debt.
    tokens: i128,
    last_ns: u64,
}

impl RateLimiter {
    /// A limiter at `speed` bytes/s (0 = unlimited), starting with a full bucket.
    pub fn new(speed: u64, now_ns: u64) -> Self {
        let mut r = Self {
            speed,
            tokens: 0,
            last_ns: now_ns,
        };
        r.tokens = r.burst() as i128;
        r
    }

    /// Bytes per second (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.speed
    }

    fn burst(&self) -> u64 {
        ((self.speed as u128 * SLICE_NS as u128) / NS).max(1) as u64
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns) as u128;
        self.last_ns = self.last_ns.max(now_ns);
        if self.speed == 0 {
            return;
        }
        let earned = (dt * self.speed as u128 / NS) as i128;
        self.tokens = (self.tokens + earned).min(self.burst() as i128);
    }

    /// Changes the speed now: tokens earned so far are kept, capped at the new burst.
    pub fn set_speed(&mut self, speed: u64, now_ns: u64) {
        self.refill(now_ns);
        self.speed = speed;
        if speed == 0 {
            self.tokens = 0;
        } else {
            self.tokens = self.tokens.min(self.burst() as i128);
        }
    }

    /// Tries to start `n` bytes at `now_ns`: `None` when they may start (the
    /// tokens are taken), else `Some(ns)` to wait before asking again.
    pub fn try_acquire(&mut self, n: u64, now_ns: u64) -> Option<u64> {
        if self.speed == 0 {
            return None;
        }
        self.refill(now_ns);
        let need = n.min(self.burst()) as i128;
        if self.tokens >= need {
            self.tokens -= n as i128;
            return None;
        }
        let missing = (need - self.tokens) as u128;
        let wait = (missing * NS).div_ceil(self.speed as u128);
        Some(wait.min(u64::MAX as u128) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a job that starts `chunk`-byte requests as fast as the limiter allows.
    fn simulate(r: &mut RateLimiter, chunk: u64, from_ns: u64, until_ns: u64) -> u64 {
        let mut now = from_ns;
        let mut started = 0;
        while now < until_ns {
            match r.try_acquire(chunk, now) {
                None => started += chunk,
                Some(w) => now += w.max(1),
            }
        }
        started
    }

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimiter::new(0, 0);
        assert_eq!(r.try_acquire(1 << 30, 0), None);
    }

    #[test]
    fn rate_is_respected_without_overshoot() {
        let speed = 10 << 20;
        let mut r = RateLimiter::new(speed, 0);
        let secs = 5;
        let got = simulate(&mut r, 512 << 10, 0, secs * 1_000_000_000);
        let burst = speed / 10;
        assert!(
            got <= speed * secs + burst + (512 << 10),
            "started {got} bytes, more than allowed"
        );
        assert!(got >= speed * secs * 95 / 100, "started only {got} bytes");
    }

    #[test]
    fn chunks_bigger_than_the_burst_still_progress() {
        let speed = 1 << 20; // burst 100 KiB, chunks of 1 MiB
        let mut r = RateLimiter::new(speed, 0);
        let got = simulate(&mut r, 1 << 20, 0, 10_000_000_000);
        assert!((9 << 20..=11 << 20).contains(&got), "got {got}");
    }

    #[test]
    fn speed_change_takes_effect_at_once() {
        let mut r = RateLimiter::new(1 << 20, 0);
        let _ = simulate(&mut r, 64 << 10, 0, 1_000_000_000);
        // Lower the speed: the next second must not start more than the new rate + burst.
        r.set_speed(64 << 10, 1_000_000_000);
        let got = simulate(&mut r, 64 << 10, 1_000_000_000, 2_000_000_000);
        assert!(got <= (64 << 10) * 2, "after slowing down: {got}");
        // Raise it: progress resumes at the new rate immediately.
        r.set_speed(100 << 20, 2_000_000_000);
        let got = simulate(&mut r, 64 << 10, 2_000_000_000, 2_100_000_000);
        assert!(got >= 9 << 20, "after speeding up: {got}");
        r.set_speed(0, 2_100_000_000);
        assert_eq!(r.try_acquire(1 << 30, 2_100_000_000), None);
    }
}

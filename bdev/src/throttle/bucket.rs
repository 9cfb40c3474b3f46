//! The buckets' levels and QEMU's arithmetic (`util/throttle.c`:
//! `throttle_leak_bucket`, `throttle_compute_wait`, `throttle_account`),
//! driven by an explicit clock so that it is testable.

use super::config::{BucketKind, ThrottleConfig};

const NS: f64 = 1_000_000_000.0;

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

/// A config with its buckets' levels.
#[derive(Debug, Clone)]
pub struct ThrottleState {
    cfg: ThrottleConfig,
    levels: [Level; 6],
    last_ns: u64,
}

impl ThrottleState {
    /// Empty buckets at `now_ns`.
    pub fn new(cfg: ThrottleConfig, now_ns: u64) -> Self {
        ThrottleState {
            cfg,
            levels: [Level::default(); 6],
            last_ns: now_ns,
        }
    }

    /// The config.
    pub fn config(&self) -> &ThrottleConfig {
        &self.cfg
    }

    /// Changes the config; the levels of buckets still limited stay (QEMU's
    /// `throttle_config` keeps them), the others empty.
    pub fn set_config(&mut self, cfg: ThrottleConfig) {
        for (i, b) in cfg.buckets.iter().enumerate() {
            if b.avg == 0 {
                self.levels[i] = Level::default();
            }
        }
        self.cfg = cfg;
    }

    fn leak(&mut self, now_ns: u64) {
        let delta = now_ns.saturating_sub(self.last_ns) as f64;
        self.last_ns = self.last_ns.max(now_ns);
        for (l, b) in self.levels.iter_mut().zip(self.cfg.buckets.iter()) {
            l.level = (l.level - b.avg as f64 * delta / NS).max(0.0);
            if b.burst_length > 1 {
                l.burst_level = (l.burst_level - b.max as f64 * delta / NS).max(0.0);
            }
        }
    }

    /// QEMU's `throttle_compute_wait` for one bucket, in nanoseconds.
    fn wait_of(&self, k: BucketKind) -> u64 {
        let b = self.cfg.get(k);
        let l = &self.levels[k as usize];
        if b.avg == 0 {
            return 0;
        }
        let (bucket_size, burst_bucket_size) = if b.max == 0 {
            (b.avg as f64 / 10.0, 0.0)
        } else {
            (b.max as f64 * b.burst_length as f64, b.max as f64 / 10.0)
        };
        let extra = l.level - bucket_size;
        if extra > 0.0 {
            return (extra * NS / b.avg as f64) as u64;
        }
        if b.burst_length > 1 {
            let extra = l.burst_level - burst_bucket_size;
            if extra > 0.0 {
                return (extra * NS / b.max as f64) as u64;
            }
        }
        0
    }

    /// The buckets a request of this direction fills.
    fn kinds(is_write: bool) -> [BucketKind; 4] {
        use BucketKind::*;
        if is_write {
            [BpsTotal, BpsWrite, OpsTotal, OpsWrite]
        } else {
            [BpsTotal, BpsRead, OpsTotal, OpsRead]
        }
    }

    /// How long a request would wait now, without reserving (0: it may go).
    pub fn peek_wait(&mut self, is_write: bool, now_ns: u64) -> u64 {
        self.leak(now_ns);
        Self::kinds(is_write)
            .iter()
            .map(|&k| self.wait_of(k))
            .max()
            .unwrap_or(0)
    }

    /// Reserves a request of `bytes`: returns how long it must wait (in
    /// nanoseconds from `now_ns`) and accounts it at once, so that the
    /// next request waits behind it.
    pub fn reserve(&mut self, is_write: bool, bytes: u64, now_ns: u64) -> u64 {
        let wait = self.peek_wait(is_write, now_ns);
        let units = if self.cfg.op_size != 0 && bytes > self.cfg.op_size {
            bytes as f64 / self.cfg.op_size as f64
        } else {
            1.0
        };
        for k in Self::kinds(is_write) {
            let add = if k.counts_ops() { units } else { bytes as f64 };
            let b = *self.cfg.get(k);
            let l = &mut self.levels[k as usize];
            if b.avg != 0 {
                l.level += add;
                if b.burst_length > 1 {
                    l.burst_level += add;
                }
            }
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests served back to back at their reserved times move at the
    /// average rate (after the tenth-of-a-second allowance).
    #[test]
    fn holds_average_rate() {
        let mut c = ThrottleConfig::default();
        c.get_mut(BucketKind::BpsTotal).avg = 10 << 20;
        let mut s = ThrottleState::new(c, 0);
        let mut now = 0u64;
        let mut bytes = 0u64;
        // A client with a queue depth of 8 submits as soon as one completes.
        let mut due: Vec<u64> = (0..8).map(|_| s.reserve(false, 65536, 0)).collect();
        while now < 10_000_000_000 {
            due.sort();
            let t = due.remove(0);
            now = t.max(now);
            bytes += 65536;
            due.push(now + s.reserve(true, 65536, now));
        }
        let rate = bytes as f64 / 10.0;
        let want = (10 << 20) as f64;
        assert!((rate / want - 1.0).abs() < 0.02, "rate {rate} want {want}");
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let mut c = ThrottleConfig::default();
        c.get_mut(BucketKind::OpsTotal).avg = 100;
        c.op_size = 4096;
        let mut s = ThrottleState::new(c, 0);
        // The bucket holds 10 ops (a tenth of a second); a 64 KiB write is 16.
        assert_eq!(s.reserve(true, 65536, 0), 0);
        let w = s.reserve(true, 4096, 0);
        // 16 - 10 = 6 ops over 100/s = 60 ms.
        assert!((59_000_000..=61_000_000).contains(&w), "{w}");
    }

    #[test]
    fn burst_then_average() {
        let mut c = ThrottleConfig::default();
        let b = c.get_mut(BucketKind::OpsRead);
        b.avg = 10;
        b.max = 100;
        b.burst_length = 2;
        let mut s = ThrottleState::new(c, 0);
        // 200 ops may go in a burst at up to 100/s (10 at once).
        let w: Vec<u64> = (0..12).map(|_| s.reserve(false, 512, 0)).collect();
        assert_eq!(w[..11].iter().filter(|&&x| x == 0).count(), 11);
        assert!(w[11] > 0 && w[11] < 20_000_000, "{w:?}");
        // Writes are not limited by a read bucket.
        assert_eq!(s.reserve(true, 512, 0), 0);
    }
}

//! QEMU's `ThrottleConfig` and its checks (`throttle_is_valid`).

/// The largest rate or burst QEMU accepts (`THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The six buckets, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    /// `bps`.
    BpsTotal = 0,
    /// `bps_rd`.
    BpsRead = 1,
    /// `bps_wr`.
    BpsWrite = 2,
    /// `iops`.
    OpsTotal = 3,
    /// `iops_rd`.
    OpsRead = 4,
    /// `iops_wr`.
    OpsWrite = 5,
}

impl BucketKind {
    /// All six.
    pub const ALL: [BucketKind; 6] = [
        BucketKind::BpsTotal,
        BucketKind::BpsRead,
        BucketKind::BpsWrite,
        BucketKind::OpsTotal,
        BucketKind::OpsRead,
        BucketKind::OpsWrite,
    ];

    /// QEMU's name of the average rate (`bps`, `iops_wr`, ...).
    pub fn qemu_name(self) -> &'static str {
        ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"][self as usize]
    }

    /// Whether it counts operations (else bytes).
    pub fn counts_ops(self) -> bool {
        self as usize >= 3
    }
}

/// One bucket's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLimit {
    /// Average rate per second (0 = unlimited).
    pub avg: u64,
    /// Burst rate per second (0 = none).
    pub max: u64,
    /// Seconds the burst rate may last (1 = no burst beyond QEMU's default).
    pub burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> Self {
        BucketLimit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A throttle configuration: QEMU's `ThrottleConfig`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Indexed by [`BucketKind`].
    pub buckets: [BucketLimit; 6],
    /// `iops_size`: bytes one operation stands for (0 = every request is one).
    pub op_size: u64,
}

impl ThrottleConfig {
    /// One bucket.
    pub fn get(&self, k: BucketKind) -> &BucketLimit {
        &self.buckets[k as usize]
    }

    /// One bucket, to change.
    pub fn get_mut(&mut self, k: BucketKind) -> &mut BucketLimit {
        &mut self.buckets[k as usize]
    }

    /// Whether any limit is set (QEMU's `throttle_enabled`).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// SPDK's `bdev_set_qos_limit` limits (already in I/Os and bytes per
    /// second; 0 = unlimited) as buckets: `rw_ios_per_sec` is `iops`,
    /// `rw_mbytes_per_sec` is `bps`, `r_`/`w_mbytes_per_sec` are
    /// `bps_rd`/`bps_wr`. SPDK allows a total and a per-direction limit
    /// at once, and so does the engine.
    pub fn from_spdk(rw_ios: u64, rw_bytes: u64, r_bytes: u64, w_bytes: u64) -> Self {
        let mut c = ThrottleConfig::default();
        c.get_mut(BucketKind::OpsTotal).avg = rw_ios;
        c.get_mut(BucketKind::BpsTotal).avg = rw_bytes;
        c.get_mut(BucketKind::BpsRead).avg = r_bytes;
        c.get_mut(BucketKind::BpsWrite).avg = w_bytes;
        c
    }

    /// QEMU's `throttle_is_valid`: `Err` with QEMU's words.
    pub fn check(&self) -> Result<(), String> {
        use BucketKind::*;
        let both = |t: BucketKind, r: BucketKind, w: BucketKind, f: fn(&BucketLimit) -> u64| {
            f(self.get(t)) != 0 && (f(self.get(r)) != 0 || f(self.get(w)) != 0)
        };
        if both(BpsTotal, BpsRead, BpsWrite, |b| b.avg)
            || both(OpsTotal, OpsRead, OpsWrite, |b| b.avg)
            || both(BpsTotal, BpsRead, BpsWrite, |b| b.max)
            || both(OpsTotal, OpsRead, OpsWrite, |b| b.max)
        {
            return Err("bps/iops/max total values and read/write values \
                        cannot be used at the same time"
                .into());
        }
        if self.op_size != 0
            && self.get(OpsTotal).avg == 0
            && self.get(OpsRead).avg == 0
            && self.get(OpsWrite).avg == 0
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for b in &self.buckets {
            if b.avg > THROTTLE_VALUE_MAX || b.max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if b.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if b.burst_length > 1 && b.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if b.max != 0 && b.burst_length > THROTTLE_VALUE_MAX / b.max {
                return Err("burst length too high for this burst rate".into());
            }
            if b.max != 0 && b.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if b.max != 0 && b.max < b.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_checks() {
        let mut c = ThrottleConfig::default();
        assert!(c.check().is_ok());
        assert!(!c.enabled());
        c.get_mut(BucketKind::BpsTotal).avg = 10;
        c.get_mut(BucketKind::BpsRead).avg = 10;
        assert!(c
            .check()
            .unwrap_err()
            .contains("cannot be used at the same time"));
        let mut c = ThrottleConfig {
            op_size: 4096,
            ..Default::default()
        };
        assert_eq!(
            c.check().unwrap_err(),
            "iops size requires an iops value to be set"
        );
        c.get_mut(BucketKind::OpsWrite).avg = 100;
        assert!(c.check().is_ok());
        c.get_mut(BucketKind::OpsWrite).max = 50;
        assert_eq!(
            c.check().unwrap_err(),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        c.get_mut(BucketKind::OpsWrite).max = 0;
        c.get_mut(BucketKind::OpsWrite).burst_length = 2;
        assert_eq!(
            c.check().unwrap_err(),
            "burst length set without burst rate"
        );
        c.get_mut(BucketKind::OpsWrite).burst_length = 0;
        assert_eq!(c.check().unwrap_err(), "the burst length cannot be 0");
        c.get_mut(BucketKind::OpsWrite).burst_length = 1;
        c.get_mut(BucketKind::BpsRead).max = 5;
        assert_eq!(
            c.check().unwrap_err(),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        c.get_mut(BucketKind::BpsRead).max = u64::MAX;
        assert!(c
            .check()
            .unwrap_err()
            .starts_with("bps/iops/max values must be within [0, 1000000000000000]"));
    }
}

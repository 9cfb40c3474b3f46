//! QEMU's qcow2 cache options (`l2-cache-size`, `refcount-cache-size`,
//! `cache-size`, `l2-cache-entry-size`, `cache-clean-interval`) and how
//! QEMU resolves them (`read_cache_sizes`, `qcow2_update_options_prepare`),
//! with its error words.
//!
//! Defaults: the L2 cache covers the whole image up to 32 MiB (QEMU's
//! `DEFAULT_L2_CACHE_MAX_SIZE` on Linux); the refcount cache is QEMU's four
//! clusters or a quarter of the L2 cache, whichever is larger (sluice's
//! refcount updates come in bursts during allocation); idle entries are
//! freed every 600 s (QEMU's `DEFAULT_CACHE_CLEAN_INTERVAL`). sluice caches
//! whole L2 tables: an `l2-cache-entry-size` below the cluster size passes
//! QEMU's checks and is then refused as unsupported.

/// The options as given (`None`: not set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOptions {
    /// `cache-size`: L2 and refcount caches together, in bytes.
    pub cache_size: Option<u64>,
    /// `l2-cache-size` in bytes.
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes.
    pub refcount_cache_size: Option<u64>,
    /// `l2-cache-entry-size` in bytes.
    pub l2_cache_entry_size: Option<u64>,
    /// `cache-clean-interval` in seconds (0: never); QAPI int64, so a
    /// negative one is kept as given and refused as QEMU refuses it.
    pub cache_clean_interval: Option<i64>,
}

/// What the options come to for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSizes {
    /// L2 cache capacity in tables (clusters).
    pub l2_tables: usize,
    /// Refcount cache capacity in blocks (clusters).
    pub refcount_blocks: usize,
    /// Seconds between frees of idle entries (0: never).
    pub clean_interval: u64,
}

const DEFAULT_L2_CACHE_MAX_SIZE: u64 = 32 << 20;
const MIN_REFCOUNT_CACHE_SIZE: u64 = 4;
const MIN_L2_CACHE_SIZE: u64 = 2;
const DEFAULT_CACHE_CLEAN_INTERVAL: i64 = 600;
const MIN_CLUSTER_BITS: u32 = 9;

impl CacheOptions {
    /// Resolves the options for an image of `cluster_size` bytes per
    /// cluster and `virtual_size` bytes, as QEMU does. `Err`: QEMU's words.
    pub fn resolve(&self, cluster_size: u64, virtual_size: u64) -> Result<CacheSizes, String> {
        let cs = cluster_size;
        let min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cs;
        let max_l2_entries = virtual_size.div_ceil(cs);
        let max_l2_cache = (max_l2_entries * 8).next_multiple_of(cs);
        let l2_max_setting = self.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE_MAX_SIZE);
        let mut refcount = self.refcount_cache_size.unwrap_or(0);
        let mut l2 = max_l2_cache.min(l2_max_setting);
        let entry = self.l2_cache_entry_size.unwrap_or(cs);
        match self.cache_size {
            Some(combined) => {
                let (l2_set, rc_set) = (
                    self.l2_cache_size.is_some(),
                    self.refcount_cache_size.is_some(),
                );
                if l2_set && rc_set {
                    return Err("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time".into());
                } else if l2_set && l2_max_setting > combined {
                    return Err("l2-cache-size may not exceed cache-size".into());
                } else if refcount > combined {
                    return Err("refcount-cache-size may not exceed cache-size".into());
                }
                if l2_set {
                    refcount = combined - l2;
                } else if rc_set {
                    l2 = combined - refcount;
                } else if combined >= max_l2_cache + min_refcount_cache {
                    l2 = max_l2_cache;
                    refcount = combined - l2;
                } else {
                    refcount = combined.min(min_refcount_cache);
                    l2 = combined - refcount;
                }
            }
            None => {
                if self.refcount_cache_size.is_none() {
                    refcount = min_refcount_cache.max(l2 / 4);
                }
            }
        }
        if entry < 1 << MIN_CLUSTER_BITS || entry > cs || !entry.is_power_of_two() {
            return Err(format!(
                "L2 cache entry size must be a power of two between {} and the cluster size ({cs})",
                1 << MIN_CLUSTER_BITS
            ));
        }
        let l2_tables = (l2 / entry).max(MIN_L2_CACHE_SIZE);
        if l2_tables > i32::MAX as u64 {
            return Err("L2 cache size too big".into());
        }
        let refcount_blocks = (refcount / cs).max(MIN_REFCOUNT_CACHE_SIZE);
        if refcount_blocks > i32::MAX as u64 {
            return Err("Refcount cache size too big".into());
        }
        let interval = self
            .cache_clean_interval
            .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL);
        if !(0..=u32::MAX as i64).contains(&interval) {
            return Err("Cache clean interval too big".into());
        }
        if entry != cs {
            return Err(format!(
                "l2-cache-entry-size {entry} is not supported by sluice (L2 tables are cached whole: only the cluster size, {cs})"
            ));
        }
        Ok(CacheSizes {
            l2_tables: l2_tables as usize,
            refcount_blocks: refcount_blocks as usize,
            clean_interval: interval as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const CS: u64 = 65536;
    const G: u64 = 1 << 30;

    fn r(o: CacheOptions, size: u64) -> Result<CacheSizes, String> {
        o.resolve(CS, size)
    }

    #[test]
    fn defaults_cover_the_image_up_to_32_mib() {
        // 1 GiB: 16384 clusters, 128 KiB of L2 = 2 tables.
        let s = r(CacheOptions::default(), G).unwrap();
        assert_eq!(
            (s.l2_tables, s.refcount_blocks, s.clean_interval),
            (2, 4, 600)
        );
        // 4 TiB: 64 MiB of L2 tables, capped at 32 MiB = 512 tables.
        let s = r(CacheOptions::default(), 4 << 40).unwrap();
        assert_eq!((s.l2_tables, s.refcount_blocks), (512, 128));
    }

    #[test]
    fn combined_size_is_split_as_qemu_splits_it() {
        let o = CacheOptions {
            cache_size: Some(1 << 20),
            ..Default::default()
        };
        // 1 GiB needs 128 KiB of L2; the rest goes to refcounts.
        let s = r(o, G).unwrap();
        assert_eq!((s.l2_tables, s.refcount_blocks), (2, 14));
        // 4 TiB: refcounts get their minimum, L2 the rest.
        let s = r(o, 4 << 40).unwrap();
        assert_eq!((s.l2_tables, s.refcount_blocks), (12, 4));
        let o = CacheOptions {
            cache_size: Some(1 << 20),
            l2_cache_size: Some(1 << 19),
            ..Default::default()
        };
        assert_eq!(r(o, 4 << 40).unwrap().refcount_blocks, 8);
    }

    #[test]
    fn qemu_refusals() {
        let all = CacheOptions {
            cache_size: Some(1 << 20),
            l2_cache_size: Some(1 << 20),
            refcount_cache_size: Some(1 << 16),
            ..Default::default()
        };
        assert!(r(all, G)
            .unwrap_err()
            .contains("may not be set at the same time"));
        let o = CacheOptions {
            cache_size: Some(1 << 20),
            l2_cache_size: Some(2 << 20),
            ..Default::default()
        };
        assert_eq!(
            r(o, G).unwrap_err(),
            "l2-cache-size may not exceed cache-size"
        );
        let o = CacheOptions {
            cache_size: Some(1 << 20),
            refcount_cache_size: Some(2 << 20),
            ..Default::default()
        };
        assert_eq!(
            r(o, G).unwrap_err(),
            "refcount-cache-size may not exceed cache-size"
        );
        for e in [256, 1000, 131072] {
            let o = CacheOptions {
                l2_cache_entry_size: Some(e),
                ..Default::default()
            };
            assert!(r(o, G).unwrap_err().starts_with("L2 cache entry size must be a power of two between 512 and the cluster size (65536)"));
        }
        let o = CacheOptions {
            cache_clean_interval: Some(-1),
            ..Default::default()
        };
        assert_eq!(r(o, G).unwrap_err(), "Cache clean interval too big");
        let o = CacheOptions {
            refcount_cache_size: Some(1 << 62),
            ..Default::default()
        };
        assert_eq!(r(o, G).unwrap_err(), "Refcount cache size too big");
        // A huge L2 setting is capped by what the image needs.
        let o = CacheOptions {
            l2_cache_size: Some(1 << 62),
            ..Default::default()
        };
        assert!(r(o, G).is_ok());
    }
}

//! The process-wide DMA arena: a few large mappings (hugepages when reserved,
//! ordinary pages otherwise, populated and locked) sub-allocated into aligned
//! blocks. Small blocks are cached per power-of-two size class; larger ones come
//! from a best-fit list of free extents that coalesce on free.

use crate::error::BdevError;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Smallest block (and alignment of every block).
pub(crate) const MIN_BLOCK: usize = 4096;
/// Number of cached size classes: 4 KiB << 0 ..= 4 KiB << 8 (1 MiB).
const CLASSES: usize = 9;
const MAX_CLASS_SIZE: usize = MIN_BLOCK << (CLASSES - 1);

/// How the arena gets its memory.
#[derive(Debug, Clone)]
pub struct ArenaConfig {
    /// Bytes mapped when the arena is first used.
    pub initial: usize,
    /// Minimum bytes added when the arena is exhausted.
    pub grow: usize,
    /// Upper bound on the arena's total size (allocation fails beyond it).
    pub max: usize,
    /// Try hugepages first (`false` forces ordinary pages).
    pub hugepages: bool,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        Self {
            initial: 32 << 20,
            grow: 64 << 20,
            max: 64 << 30,
            hugepages: std::env::var_os("SLUICE_NO_HUGE").is_none(),
        }
    }
}

/// A callback told about every region (its virtual address and length), for
/// drivers that map DMA memory into an IOMMU once.
pub type RegionListener = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// One mapping of the arena.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) huge: bool,
}

/// Counters of the arena (for `env_dpdk_get_mem_stats`-like reporting and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ArenaStats {
    /// Number of regions mapped.
    pub regions: usize,
    /// Bytes mapped in all regions.
    pub total_bytes: usize,
    /// Bytes handed out in live buffers.
    pub used_bytes: usize,
    /// Whether any region is backed by hugepages.
    pub hugepages: bool,
}

struct State {
    cfg: ArenaConfig,
    regions: Vec<Region>,
    /// Free extents by address -> length.
    by_addr: BTreeMap<usize, usize>,
    /// Free extents by (length, address), for best fit.
    by_size: BTreeSet<(usize, usize)>,
    /// Cached free blocks per size class.
    classes: [Vec<usize>; CLASSES],
    used: usize,
    listeners: Vec<RegionListener>,
    huge_failed: bool,
    warned_small: bool,
}

pub(crate) struct Arena {
    state: Mutex<State>,
}

static ARENA: OnceLock<Arena> = OnceLock::new();
static CONFIG: Mutex<Option<ArenaConfig>> = Mutex::new(None);

/// Sets the arena's configuration; only before the first DMA allocation.
pub fn configure(cfg: ArenaConfig) -> Result<(), BdevError> {
    if ARENA.get().is_some() {
        return Err(BdevError::InvalidParam(
            "the DMA arena is already in use; configure it before the first allocation".into(),
        ));
    }
    *CONFIG.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg);
    Ok(())
}

/// The arena, created (with its first region) on first use.
pub(crate) fn arena() -> &'static Arena {
    ARENA.get_or_init(|| {
        let cfg = CONFIG
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let a = Arena {
            state: Mutex::new(State {
                cfg: cfg.clone(),
                regions: Vec::new(),
                by_addr: BTreeMap::new(),
                by_size: BTreeSet::new(),
                classes: Default::default(),
                used: 0,
                listeners: Vec::new(),
                huge_failed: false,
                warned_small: false,
            }),
        };
        if cfg.initial > 0 {
            let mut st = a.lock();
            if let Err(e) = st.add_region(cfg.initial, true) {
                tracing::error!(error = %e, "could not map the initial DMA arena region");
            }
        }
        a
    })
}

/// Size of a block for a request of `len` bytes: a power-of-two class up to
/// 1 MiB, else a multiple of 4 KiB.
pub(crate) fn block_size_for(len: usize) -> usize {
    let len = len.max(1);
    if len <= MAX_CLASS_SIZE {
        len.next_power_of_two().max(MIN_BLOCK)
    } else {
        len.next_multiple_of(MIN_BLOCK)
    }
}

fn class_of(size: usize) -> Option<usize> {
    if size <= MAX_CLASS_SIZE && size.is_power_of_two() && size >= MIN_BLOCK {
        Some((size / MIN_BLOCK).trailing_zeros() as usize)
    } else {
        None
    }
}

impl Arena {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A block of exactly `size` bytes (from [`block_size_for`]), 4 KiB aligned.
    pub(crate) fn alloc(&self, size: usize) -> Result<usize, BdevError> {
        self.alloc_with(size, true)
    }

    /// Like [`Arena::alloc`]; with `small_pages` false the arena only grows with
    /// hugepages (for large optional users such as malloc bdevs).
    pub(crate) fn alloc_with(&self, size: usize, small_pages: bool) -> Result<usize, BdevError> {
        let mut st = self.lock();
        if let Some(c) = class_of(size) {
            if let Some(a) = st.classes[c].pop() {
                st.used += size;
                return Ok(a);
            }
        }
        let addr = match st.take_extent(size) {
            Some(a) => a,
            None => {
                // Return cached small blocks to the extent list (they may coalesce)
                // before mapping more memory.
                st.flush_classes();
                match st.take_extent(size) {
                    Some(a) => a,
                    None => {
                        let grow = st.cfg.grow.max(size);
                        st.add_region(grow, small_pages)?;
                        st.take_extent(size).ok_or_else(|| {
                            BdevError::NoMem(format!("{size} bytes of DMA memory"))
                        })?
                    }
                }
            }
        };
        st.used += size;
        Ok(addr)
    }

    /// Returns a block from [`Arena::alloc`].
    pub(crate) fn free(&self, addr: usize, size: usize) {
        let mut st = self.lock();
        st.used = st.used.saturating_sub(size);
        match class_of(size) {
            Some(c) => st.classes[c].push(addr),
            None => st.insert_extent(addr, size),
        }
    }

    pub(crate) fn regions(&self) -> Vec<Region> {
        self.lock().regions.clone()
    }

    pub(crate) fn subscribe(&self, f: RegionListener) {
        let mut st = self.lock();
        for r in &st.regions {
            f(r.base, r.len);
        }
        st.listeners.push(f);
    }

    pub(crate) fn stats(&self) -> ArenaStats {
        let st = self.lock();
        ArenaStats {
            regions: st.regions.len(),
            total_bytes: st.regions.iter().map(|r| r.len).sum(),
            used_bytes: st.used,
            hugepages: st.regions.iter().any(|r| r.huge),
        }
    }
}

impl State {
    fn take_extent(&mut self, size: usize) -> Option<usize> {
        let &(len, addr) = self.by_size.range((size, 0)..).next()?;
        self.by_size.remove(&(len, addr));
        self.by_addr.remove(&addr);
        if len > size {
            self.by_addr.insert(addr + size, len - size);
            self.by_size.insert((len - size, addr + size));
        }
        Some(addr)
    }

    fn region_of(&self, addr: usize) -> Option<Region> {
        self.regions
            .iter()
            .copied()
            .find(|r| addr >= r.base && addr < r.base + r.len)
    }

    fn insert_extent(&mut self, mut addr: usize, mut len: usize) {
        let Some(region) = self.region_of(addr) else {
            tracing::error!(addr, len, "freeing memory outside the DMA arena; leaked");
            return;
        };
        // Merge with the previous extent if it ends here, in the same region.
        if let Some((&pa, &pl)) = self.by_addr.range(..addr).next_back() {
            if pa + pl == addr && pa >= region.base {
                self.by_addr.remove(&pa);
                self.by_size.remove(&(pl, pa));
                addr = pa;
                len += pl;
            }
        }
        // And with the next one if it starts where this ends.
        let end = addr + len;
        if end < region.base + region.len {
            if let Some(nl) = self.by_addr.remove(&end) {
                self.by_size.remove(&(nl, end));
                len += nl;
            }
        }
        self.by_addr.insert(addr, len);
        self.by_size.insert((len, addr));
    }

    fn flush_classes(&mut self) {
        for c in 0..CLASSES {
            let blocks = std::mem::take(&mut self.classes[c]);
            for a in blocks {
                self.insert_extent(a, MIN_BLOCK << c);
            }
        }
    }

    fn add_region(&mut self, want: usize, small_pages: bool) -> Result<(), BdevError> {
        let total: usize = self.regions.iter().map(|r| r.len).sum();
        if total + want > self.cfg.max {
            return Err(BdevError::NoMem(format!(
                "DMA arena limit reached ({} MiB mapped, {} MiB more wanted, limit {} MiB)",
                total >> 20,
                want.div_ceil(1 << 20),
                self.cfg.max >> 20
            )));
        }
        let try_huge = self.cfg.hugepages && !self.huge_failed;
        if !small_pages && !try_huge {
            return Err(BdevError::NoMem(format!(
                "{} MiB of hugepage memory (none reserved)",
                want.div_ceil(1 << 20)
            )));
        }
        let region = super::map::map_region(want, try_huge, small_pages)?;
        if !region.huge && !self.warned_small {
            self.warned_small = true;
            if self.cfg.hugepages {
                self.huge_failed = true;
                tracing::warn!(
                    "no hugepages available (reserve some in /proc/sys/vm/nr_hugepages); DMA memory falls back to \
                     ordinary pages: slower, and not usable by VFIO drivers that need pinned hugepages"
                );
            } else {
                tracing::warn!(
                    "hugepages disabled (SLUICE_NO_HUGE); DMA memory uses ordinary pages"
                );
            }
        }
        tracing::info!(
            addr = format_args!("{:#x}", region.base),
            mib = region.len >> 20,
            huge = region.huge,
            "DMA arena region mapped"
        );
        self.regions.push(region);
        self.by_addr.insert(region.base, region.len);
        self.by_size.insert((region.len, region.base));
        for f in &self.listeners {
            f(region.base, region.len);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert_eq!(block_size_for(0), 4096);
        assert_eq!(block_size_for(1), 4096);
        assert_eq!(block_size_for(4097), 8192);
        assert_eq!(block_size_for(1 << 20), 1 << 20);
        assert_eq!(block_size_for((1 << 20) + 1), (1 << 20) + 4096);
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of(3 << 20), None);
    }
}

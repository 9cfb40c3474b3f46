//! A small write-back cache of metadata clusters (L2 tables, refcount blocks),
//! keyed by host offset, with LRU eviction. Only the owner reactor touches it;
//! how full it is can be read from anywhere ([`CacheUsage`]). Entries left
//! unused for a whole `cache-clean-interval` are freed
//! ([`TableCache::clean_unused`], QEMU's `qcow2_cache_clean_unused`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Entries held and allowed in an image's two caches, and entries freed
/// as idle, readable from any thread.
#[derive(Debug, Default)]
pub struct CacheUsage {
    /// L2 tables cached.
    pub l2: AtomicUsize,
    /// L2 tables allowed.
    pub l2_max: AtomicUsize,
    /// Refcount blocks cached.
    pub refcount: AtomicUsize,
    /// Refcount blocks allowed.
    pub refcount_max: AtomicUsize,
    /// Entries freed by the idle cleaner so far.
    pub cleaned: AtomicU64,
}

struct Slot {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

/// Cached metadata clusters.
pub(crate) struct TableCache {
    slots: RefCell<HashMap<u64, Slot>>,
    capacity: usize,
    clock: Cell<u64>,
    /// The clock at the last idle clean: entries not used since are idle.
    clean_mark: Cell<u64>,
    usage: Arc<CacheUsage>,
    l2: bool,
}

impl TableCache {
    /// A cache holding up to `capacity` clusters (at least 4: the engine
    /// holds a few at once), counted in `usage` as the L2 cache (`l2`) or
    /// the refcount cache.
    pub(crate) fn new(capacity: usize, usage: Arc<CacheUsage>, l2: bool) -> Self {
        let capacity = capacity.max(4);
        let max = if l2 {
            &usage.l2_max
        } else {
            &usage.refcount_max
        };
        max.store(capacity, Ordering::Relaxed);
        Self {
            slots: RefCell::new(HashMap::new()),
            capacity,
            clock: Cell::new(0),
            clean_mark: Cell::new(0),
            usage,
            l2,
        }
    }

    fn count(&self) {
        let n = self.slots.borrow().len();
        let c = if self.l2 {
            &self.usage.l2
        } else {
            &self.usage.refcount
        };
        c.store(n, Ordering::Relaxed);
    }

    /// Frees the clean entries not used since the previous call; returns
    /// how many.
    pub(crate) fn clean_unused(&self) -> usize {
        let mark = self.clean_mark.replace(self.clock.get());
        let before = self.slots.borrow().len();
        self.slots
            .borrow_mut()
            .retain(|_, s| s.dirty || s.last_use > mark);
        let n = before - self.slots.borrow().len();
        self.count();
        self.usage.cleaned.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    fn tick(&self) -> u64 {
        let t = self.clock.get() + 1;
        self.clock.set(t);
        t
    }

    /// Whether the cluster at `off` is cached.
    pub(crate) fn contains(&self, off: u64) -> bool {
        self.slots.borrow().contains_key(&off)
    }

    /// Runs `f` on the cached cluster at `off`, if present.
    pub(crate) fn with<R>(&self, off: u64, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let t = self.tick();
        let mut m = self.slots.borrow_mut();
        let s = m.get_mut(&off)?;
        s.last_use = t;
        Some(f(&s.data))
    }

    /// Runs `f` on the cached cluster at `off` mutably and marks it dirty.
    pub(crate) fn with_mut<R>(&self, off: u64, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let t = self.tick();
        let mut m = self.slots.borrow_mut();
        let s = m.get_mut(&off)?;
        s.last_use = t;
        s.dirty = true;
        Some(f(&mut s.data))
    }

    /// Inserts a cluster (clean or dirty). The caller made room first.
    pub(crate) fn insert(&self, off: u64, data: Vec<u8>, dirty: bool) {
        let t = self.tick();
        self.slots.borrow_mut().insert(
            off,
            Slot {
                data,
                dirty,
                last_use: t,
            },
        );
        self.count();
    }

    /// Whether inserting one more cluster needs an eviction first.
    pub(crate) fn full(&self) -> bool {
        self.slots.borrow().len() >= self.capacity
    }

    /// The least recently used entry: offset and whether it is dirty.
    pub(crate) fn victim(&self) -> Option<(u64, bool)> {
        self.slots
            .borrow()
            .iter()
            .min_by_key(|(_, s)| s.last_use)
            .map(|(o, s)| (*o, s.dirty))
    }

    /// Drops a clean entry (dirty ones must be written first).
    pub(crate) fn remove(&self, off: u64) {
        self.slots.borrow_mut().remove(&off);
        self.count();
    }

    /// Offsets and copies of every dirty cluster, sorted by offset.
    pub(crate) fn dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let m = self.slots.borrow();
        let mut v: Vec<(u64, Vec<u8>)> = m
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(o, s)| (*o, s.data.clone()))
            .collect();
        v.sort_by_key(|(o, _)| *o);
        v
    }

    /// Marks a cluster clean if its contents still equal what was written.
    pub(crate) fn mark_clean(&self, off: u64, written: &[u8]) {
        if let Some(s) = self.slots.borrow_mut().get_mut(&off) {
            if s.data == written {
                s.dirty = false;
            }
        }
    }

    /// Whether anything is dirty.
    pub(crate) fn any_dirty(&self) -> bool {
        self.slots.borrow().values().any(|s| s.dirty)
    }
}

//! The generic front of every channel: validation, statistics and the
//! per-reactor cache of channels (one per bdev per reactor).
//!
//! A cached channel holds its bdev (and a uring channel its file and a
//! share of the reactor's ring), so an entry lives until it is dropped: a registered node's by
//! its delete (`Registry::delete`, the graph's deletes), a hidden bdev's (one
//! no registry holds, such as the file under an image or a backing image
//! opened from its header's name) by [`release_hidden`] when its owner ends.

use crate::bdev::{Bdev, Channel};
use crate::deferred::complete_deferred;
use crate::error::BdevError;
use crate::io::{BdevIo, IoStatus, IoType};
use crate::stats::IoStats;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// A bdev's channel on this reactor, wrapped with request validation and stats.
pub struct IoChannel {
    bdev: Arc<dyn Bdev>,
    inner: Box<dyn Channel>,
    block_mask: u64,
    size: std::cell::Cell<u64>,
    read_only: std::cell::Cell<bool>,
    supported: [bool; 5],
    stats: Rc<IoStats>,
}

fn type_index(t: IoType) -> usize {
    match t {
        IoType::Read => 0,
        IoType::Write => 1,
        IoType::Flush => 2,
        IoType::Unmap => 3,
        IoType::WriteZeroes => 4,
    }
}

impl IoChannel {
    fn new(bdev: Arc<dyn Bdev>) -> Result<Self, BdevError> {
        let inner = bdev.create_channel()?;
        let mut supported = [false; 5];
        for t in [
            IoType::Read,
            IoType::Write,
            IoType::Flush,
            IoType::Unmap,
            IoType::WriteZeroes,
        ] {
            supported[type_index(t)] = bdev.io_type_supported(t);
        }
        Ok(Self {
            block_mask: bdev.block_size() as u64 - 1,
            size: std::cell::Cell::new(bdev.size()),
            read_only: std::cell::Cell::new(bdev.read_only()),
            supported,
            stats: Rc::new(IoStats::default()),
            inner,
            bdev,
        })
    }

    /// The bdev behind this channel.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    /// This reactor's counters for the bdev.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Validates and submits. Invalid requests complete (later) with `Einval`,
    /// `Unsupported` or `ReadOnly`; `Err(io)` means the queue is full.
    #[inline]
    pub fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        self.submit_at(io, reactor::ticks())
    }

    /// [`IoChannel::submit`] with the submission tick given by the caller (one
    /// that has just read the clock, e.g. a completion resubmitting at once:
    /// [`BdevIo::complete_tick`]), saving a clock read per request.
    #[inline]
    pub fn submit_at(&self, mut io: Box<BdevIo>, now: u64) -> Result<(), Box<BdevIo>> {
        io.submit_tick = now;
        io.stats = Some(self.stats.clone());
        if let Some(bad) = self.check(&io) {
            complete_deferred(io, bad);
            return Ok(());
        }
        self.inner.submit(io)
    }

    #[inline]
    fn check(&self, io: &BdevIo) -> Option<IoStatus> {
        let t = io.io_type;
        if !self.supported[type_index(t)] {
            return Some(IoStatus::Unsupported);
        }
        if self.read_only.get() && t != IoType::Read && t != IoType::Flush {
            return Some(IoStatus::ReadOnly);
        }
        if t == IoType::Flush {
            return None;
        }
        let end = io.offset.checked_add(io.len);
        if (io.offset | io.len) & self.block_mask != 0
            || end.is_none_or(|e| e > self.size.get())
            || io.len == 0
        {
            return Some(IoStatus::Einval);
        }
        if t.has_data() && io.iovs().iter().map(|v| v.len() as u64).sum::<u64>() < io.len {
            return Some(IoStatus::Einval);
        }
        None
    }

    /// See [`Channel::wait_for_space`].
    pub fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.inner.wait_for_space(f)
    }

    /// See [`Channel::kick`].
    #[inline]
    pub fn kick(&self) {
        self.inner.kick()
    }
}

thread_local! {
    static CHANNELS: RefCell<HashMap<usize, Rc<IoChannel>>> = RefCell::new(HashMap::new());
}

fn key(b: &Arc<dyn Bdev>) -> usize {
    Arc::as_ptr(b) as *const () as usize
}

/// Checks this reactor's cached channels against their bdevs' sizes and
/// read-only state again (after a resize or a reopen: run on every reactor).
pub fn refresh_channel_sizes() {
    CHANNELS.with(|m| {
        for c in m.borrow().values() {
            c.size.set(c.bdev.size());
            let ro = c.bdev.read_only();
            if ro != c.read_only.get() {
                c.inner.file_reopened();
                c.read_only.set(ro);
            }
        }
    });
}

/// This reactor's channel to `bdev`, created on first use and cached.
pub fn channel(bdev: &Arc<dyn Bdev>) -> Result<Rc<IoChannel>, BdevError> {
    let k = key(bdev);
    if let Some(c) = CHANNELS.with(|m| m.borrow().get(&k).cloned()) {
        return Ok(c);
    }
    let c = Rc::new(IoChannel::new(bdev.clone())?);
    CHANNELS.with(|m| m.borrow_mut().insert(k, c.clone()));
    Ok(c)
}

/// Drops this reactor's cached channel to `bdev` (on delete), returning its final stats.
pub fn drop_cached_channels(bdev: &Arc<dyn Bdev>) {
    let k = key(bdev);
    CHANNELS.with(|m| m.borrow_mut().remove(&k));
}

/// Drops every reactor's cached channel to `bdev` by message, without
/// waiting (callable on any thread, a reactor included): for a hidden bdev
/// whose owner is ending. The bdev and its file live until the
/// last reactor has dropped its channel; a reactor already gone has none.
pub fn release_hidden(bdev: Arc<dyn Bdev>, rt: &reactor::RuntimeHandle) {
    for i in 0..rt.num_reactors() {
        let b = bdev.clone();
        let _ = rt.send_completion(i, move || drop_cached_channels(&b));
    }
}

/// This reactor's counters for `bdev`, if it has a channel.
pub fn local_stats(bdev: &Arc<dyn Bdev>) -> Option<crate::IoStatsSnapshot> {
    let k = key(bdev);
    CHANNELS.with(|m| m.borrow().get(&k).map(|c| c.stats.snapshot()))
}

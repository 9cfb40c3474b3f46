//! The owner reactor's fast path. A read or write whose clusters are already
//! mapped (their L2 entries cached, data clusters at consecutive host offsets;
//! for writes, clusters with refcount 1 and a host range clear of metadata,
//! see `overlap.rs`) is re-targeted at the base device as
//! it is: the request itself goes down with its offset moved, and comes back
//! through a pooled forwarder that restores it. No task, no sub-request, no
//! allocation in steady state. A read of clusters that all read as zeroes is
//! answered from memory. A FUA write keeps its flag on the way down (the base
//! makes it durable) and is taken only while every piece of metadata is
//! durable ([`Image::metadata_durable`]). Everything else takes the general
//! path (a local task).

use super::format::{ClusterKind, L2Entry};
use super::image::Image;
use super::sync::DrainGuard;
use crate::stats::IoStats;
use crate::{complete_deferred, BdevIo, IoDone, IoStatus, IoType};
use std::cell::RefCell;
use std::rc::{Rc, Weak};

/// Where a fast-path request is to go.
enum Route {
    /// One base request at this host offset.
    Base(u64),
    /// Every byte reads as zeroes.
    Zeroes,
}

impl Image {
    /// How `[off, off+len)` can be served without metadata I/O, if it can:
    /// every cluster's L2 entry is cached and either all clusters are data
    /// clusters laid out consecutively on the host (for writes: all with
    /// refcount 1), or (for reads) all read as zeroes.
    fn route(&self, off: u64, len: u64, write: bool) -> Option<Route> {
        if len == 0 {
            return None;
        }
        let cs = self.cs;
        let first = off / cs;
        let last = (off + len - 1) / cs;
        let mut base_host: Option<u64> = None;
        let mut zeroes = false;
        for gc in first..=last {
            let e = self.entry_cached(gc)?;
            let kind = L2Entry(e).decode(self.version, self.cluster_bits).ok()?;
            match kind {
                ClusterKind::Normal { host, copied } => {
                    if zeroes || (write && !copied) || self.check_data_cluster(host).is_err() {
                        return None;
                    }
                    let want = host.checked_sub((gc - first) * cs)?;
                    if *base_host.get_or_insert(want) != want {
                        return None;
                    }
                }
                k if !write && base_host.is_none() && self.reads_zero(gc, k) => zeroes = true,
                _ => return None,
            }
        }
        match base_host {
            // A write that would hit metadata takes the general path, which
            // refuses it and marks the image corrupt.
            Some(h)
                if write
                    && self
                        .overlaps(self.overlap_checks, h + off % cs, len)
                        .contains_any() =>
            {
                None
            }
            Some(h) => Some(Route::Base(h + off % cs)),
            None if zeroes => Some(Route::Zeroes),
            None => None,
        }
    }
}

/// What a re-targeted request had before it went down.
struct Saved {
    offset: u64,
    submit_tick: u64,
    done: Option<Rc<dyn IoDone>>,
    stats: Option<Rc<IoStats>>,
    /// Keeps the host cluster from being freed and reused under the I/O.
    _guard: DrainGuard,
}

impl Saved {
    fn restore(self, io: &mut BdevIo) {
        io.offset = self.offset;
        io.submit_tick = self.submit_tick;
        io.stats = self.stats;
        io.set_done(self.done);
    }
}

/// A pooled completion target for one re-targeted request.
struct Forwarder {
    idx: usize,
    saved: RefCell<Option<Saved>>,
    pool: Weak<FastPath>,
}

impl IoDone for Forwarder {
    fn io_done(&self, mut io: Box<BdevIo>) {
        let saved = self.saved.borrow_mut().take();
        if let Some(p) = self.pool.upgrade() {
            p.free.borrow_mut().push(self.idx);
        }
        match saved {
            Some(s) => {
                s.restore(&mut io);
                let st = io.status;
                io.complete(st);
            }
            // Not reachable: a forwarder is only a target while it holds a request.
            None => tracing::error!("qcow2 fast path: completion without a saved request"),
        }
    }
}

/// The fast path of one owner-reactor channel.
pub(crate) struct FastPath {
    img: Rc<Image>,
    me: Weak<FastPath>,
    slots: RefCell<Vec<Rc<Forwarder>>>,
    free: RefCell<Vec<usize>>,
}

impl FastPath {
    /// A fast path over `img` (owner reactor only).
    pub(crate) fn new(img: Rc<Image>) -> Rc<Self> {
        Rc::new_cyclic(|me| FastPath {
            img,
            me: me.clone(),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        })
    }

    fn forwarder(&self) -> Rc<Forwarder> {
        if let Some(i) = self.free.borrow_mut().pop() {
            return self.slots.borrow()[i].clone();
        }
        let mut slots = self.slots.borrow_mut();
        let f = Rc::new(Forwarder {
            idx: slots.len(),
            saved: RefCell::new(None),
            pool: self.me.clone(),
        });
        slots.push(f.clone());
        f
    }

    /// Takes the request if it can go the fast way; hands it back untouched if not.
    pub(crate) fn try_submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let img = &self.img;
        let write = match io.io_type {
            IoType::Read => false,
            // A FUA write goes down as it is (the base makes it durable) only
            // when its mapping is durable already and the base's FUA is cheap;
            // else the general path writes it and then flushes the image, one
            // flush for all the FUA writes waiting together.
            IoType::Write
                if !img.read_only.get()
                    && !img.broken.get()
                    && (!io.fua || (img.native_fua && img.metadata_durable())) =>
            {
                true
            }
            _ => return Err(io),
        };
        let host = match img.route(io.offset, io.len, write) {
            None => return Err(io),
            Some(Route::Zeroes) => {
                let len = io.len as usize;
                io.zero(0, len);
                complete_deferred(io, IoStatus::Success);
                return Ok(());
            }
            Some(Route::Base(h)) => h,
        };
        let fwd = self.forwarder();
        *fwd.saved.borrow_mut() = Some(Saved {
            offset: io.offset,
            submit_tick: io.submit_tick,
            done: io.take_done(),
            stats: io.stats.take(),
            _guard: img.drain.enter(),
        });
        io.offset = host;
        io.set_done(Some(fwd.clone() as Rc<dyn IoDone>));
        match img.ch.submit(io) {
            Ok(()) => Ok(()),
            Err(mut io) => {
                // Queue full: undo; the general path waits for space.
                if let Some(s) = fwd.saved.borrow_mut().take() {
                    s.restore(&mut io);
                }
                self.free.borrow_mut().push(fwd.idx);
                Err(io)
            }
        }
    }
}

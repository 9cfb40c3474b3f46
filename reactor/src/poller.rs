//! Pollers: functions a reactor runs every iteration (active) or every period
//! (timed). They may be registered, paused, resumed and unregistered at any time,
//! also from inside a poll.

use crate::clock::{duration_to_ticks, ticks, ticks_hz};
use crate::local;
use crate::stats::PollerStats;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// What a poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// It found and did work.
    Busy,
    /// Nothing to do.
    Idle,
}

impl From<bool> for PollStatus {
    fn from(busy: bool) -> Self {
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

pub(crate) struct Poller {
    id: u64,
    name: String,
    period: u64,
    next_run: Cell<u64>,
    paused: Cell<bool>,
    removed: Cell<bool>,
    run_count: Cell<u64>,
    busy_count: Cell<u64>,
    f: RefCell<Box<dyn FnMut() -> PollStatus>>,
}

impl Poller {
    #[inline]
    fn run(&self) -> bool {
        // A poller that is already running (it re-entered the reactor) is skipped.
        let Ok(mut f) = self.f.try_borrow_mut() else {
            return false;
        };
        let busy = f() == PollStatus::Busy;
        self.run_count.set(self.run_count.get() + 1);
        if busy {
            self.busy_count.set(self.busy_count.get() + 1);
        }
        busy
    }

    fn stats(&self) -> PollerStats {
        PollerStats {
            name: self.name.clone(),
            id: self.id,
            period_us: (self.period != 0).then(|| self.period * 1_000_000 / ticks_hz().max(1)),
            state: if self.paused.get() {
                "paused"
            } else {
                "running"
            },
            run_count: self.run_count.get(),
            busy_count: self.busy_count.get(),
        }
    }
}

/// A registered poller. Dropping the handle leaves the poller registered; call
/// [`PollerHandle::unregister`] to remove it.
#[derive(Clone)]
pub struct PollerHandle {
    inner: Rc<Poller>,
}

impl PollerHandle {
    /// Stops running the poller until [`PollerHandle::resume`].
    pub fn pause(&self) {
        self.inner.paused.set(true);
    }
    /// Runs the poller again.
    pub fn resume(&self) {
        self.inner.paused.set(false);
    }
    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.inner.paused.get()
    }
    /// Removes the poller; safe to call from inside its own poll.
    pub fn unregister(&self) {
        if !self.inner.removed.replace(true) {
            local::with(|r| r.pollers.dirty.set(true));
        }
    }
    /// The poller's id on its reactor.
    pub fn id(&self) -> u64 {
        self.inner.id
    }
    /// A handle that does not keep the poller alive, for a poller that removes
    /// itself (its closure would otherwise own itself).
    pub(crate) fn downgrade(&self) -> WeakPollerHandle {
        WeakPollerHandle(Rc::downgrade(&self.inner))
    }
}

/// See [`PollerHandle::downgrade`].
pub(crate) struct WeakPollerHandle(std::rc::Weak<Poller>);

impl WeakPollerHandle {
    /// [`PollerHandle::unregister`], if the poller still exists.
    pub(crate) fn unregister(&self) {
        if let Some(inner) = self.0.upgrade() {
            PollerHandle { inner }.unregister();
        }
    }
}

#[derive(Default)]
pub(crate) struct PollerSet {
    active: RefCell<Vec<Rc<Poller>>>,
    timed: RefCell<Vec<Rc<Poller>>>,
    pub(crate) dirty: Cell<bool>,
    next_id: Cell<u64>,
}

impl PollerSet {
    fn add(&self, name: &str, period: u64, f: Box<dyn FnMut() -> PollStatus>) -> PollerHandle {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        let p = Rc::new(Poller {
            id,
            name: name.to_string(),
            period,
            next_run: Cell::new(ticks() + period),
            paused: Cell::new(false),
            removed: Cell::new(false),
            run_count: Cell::new(0),
            busy_count: Cell::new(0),
            f: RefCell::new(f),
        });
        if period == 0 {
            self.active.borrow_mut().push(p.clone());
        } else {
            self.timed.borrow_mut().push(p.clone());
        }
        PollerHandle { inner: p }
    }

    /// Runs every active poller once. Returns whether any was busy.
    #[inline]
    pub(crate) fn run_active(&self) -> bool {
        let mut busy = false;
        let mut i = 0;
        loop {
            let p = match self.active.borrow().get(i) {
                Some(p) => p.clone(),
                None => break,
            };
            if !p.paused.get() && !p.removed.get() {
                busy |= p.run();
            }
            i += 1;
        }
        busy
    }

    /// Runs the timed pollers that are due.
    #[inline]
    pub(crate) fn run_timed(&self, now: u64) -> bool {
        let mut busy = false;
        let mut i = 0;
        loop {
            let p = match self.timed.borrow().get(i) {
                Some(p) => p.clone(),
                None => break,
            };
            if !p.paused.get() && !p.removed.get() && now >= p.next_run.get() {
                p.next_run.set(now + p.period);
                busy |= p.run();
            }
            i += 1;
        }
        busy
    }

    /// Drops unregistered pollers.
    #[inline]
    pub(crate) fn sweep(&self) {
        if self.dirty.replace(false) {
            self.active.borrow_mut().retain(|p| !p.removed.get());
            self.timed.borrow_mut().retain(|p| !p.removed.get());
        }
    }

    /// The earliest tick at which a running timed poller is due.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.timed
            .borrow()
            .iter()
            .filter(|p| !p.paused.get() && !p.removed.get())
            .map(|p| p.next_run.get())
            .min()
    }

    pub(crate) fn stats(&self) -> Vec<PollerStats> {
        let mut v: Vec<PollerStats> = self.active.borrow().iter().map(|p| p.stats()).collect();
        v.extend(self.timed.borrow().iter().map(|p| p.stats()));
        v
    }

    pub(crate) fn clear(&self) {
        self.active.borrow_mut().clear();
        self.timed.borrow_mut().clear();
    }
}

/// Registers an active poller on the current reactor; it runs every iteration.
///
/// # Panics
/// When called off a reactor thread (a programming error).
pub fn register_poller(name: &str, f: impl FnMut() -> PollStatus + 'static) -> PollerHandle {
    local::with(|r| r.pollers.add(name, 0, Box::new(f)))
}

/// Registers a timed poller on the current reactor; it runs once per `period`.
///
/// # Panics
/// When called off a reactor thread (a programming error).
pub fn register_timed_poller(
    name: &str,
    period: Duration,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    let t = duration_to_ticks(period).max(1);
    local::with(|r| r.pollers.add(name, t, Box::new(f)))
}

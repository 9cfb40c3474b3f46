//! One reactor's queue of requests waiting for their reserved time.
//!
//! [`Gate::admit`] reserves a request in every group that limits it; one
//! that may go at once is handed back, the others wait in a heap ordered by
//! release time. One timer on the reactor (a `reactor::sleep` task, armed for
//! the earliest release) hands the due ones to the release function; the
//! reactor neither spins nor sleeps on them. A gate dropped with requests
//! still waiting completes them `Aborted` (nothing is lost silently).

use super::group::ThrottleGroup;
use crate::deferred::complete_deferred;
use crate::io::{BdevIo, IoStatus, IoType};
use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

struct Waiting {
    at: u64,
    seq: u64,
    io: Box<BdevIo>,
}

impl PartialEq for Waiting {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiting {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A per-reactor throttle queue (see the module doc).
pub struct Gate {
    me: Weak<Gate>,
    heap: RefCell<BinaryHeap<Reverse<Waiting>>>,
    seq: Cell<u64>,
    /// The release time the timer is armed for (`u64::MAX`: none).
    armed: Cell<u64>,
    release: Box<dyn Fn(Box<BdevIo>)>,
}

/// Whether a request of this type is limited (QEMU throttles reads and
/// writes, zeroing included; not flushes or discards).
pub fn limited(t: IoType) -> bool {
    matches!(t, IoType::Read | IoType::Write | IoType::WriteZeroes)
}

impl Gate {
    /// A gate on this reactor handing released requests to `release`.
    pub fn new(release: impl Fn(Box<BdevIo>) + 'static) -> Rc<Gate> {
        Rc::new_cyclic(|me| Gate {
            me: me.clone(),
            heap: RefCell::new(BinaryHeap::new()),
            seq: Cell::new(0),
            armed: Cell::new(u64::MAX),
            release: Box::new(release),
        })
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.heap.borrow().len()
    }

    /// Reserves `io` in every group of `groups`: `Some(io)` when it may go
    /// now, else it waits here and is released later.
    pub fn admit(&self, io: Box<BdevIo>, groups: &[Arc<ThrottleGroup>]) -> Option<Box<BdevIo>> {
        if !limited(io.io_type) {
            return Some(io);
        }
        let is_write = io.io_type != IoType::Read;
        let wait = groups
            .iter()
            .map(|g| g.reserve(is_write, io.len))
            .max()
            .unwrap_or(0);
        if wait == 0 {
            return Some(io);
        }
        let at = super::now_ns() + wait;
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        self.heap
            .borrow_mut()
            .push(Reverse(Waiting { at, seq, io }));
        self.arm(at);
        None
    }

    fn arm(&self, at: u64) {
        if at >= self.armed.get() {
            return;
        }
        self.armed.set(at);
        let me = self.me.clone();
        let d = Duration::from_nanos(at.saturating_sub(super::now_ns()));
        reactor::spawn_local(async move {
            reactor::sleep(d).await;
            if let Some(g) = me.upgrade() {
                g.fire(at);
            }
        });
    }

    /// Releases what is due (the timer armed for `at`).
    fn fire(&self, at: u64) {
        if self.armed.get() == at {
            self.armed.set(u64::MAX);
        }
        let now = super::now_ns();
        loop {
            let io = {
                let mut h = self.heap.borrow_mut();
                match h.peek() {
                    Some(Reverse(w)) if w.at <= now => h.pop().map(|Reverse(w)| w.io),
                    _ => None,
                }
            };
            let Some(io) = io else { break };
            (self.release)(io);
        }
        let next = self.heap.borrow().peek().map(|Reverse(w)| w.at);
        if let Some(n) = next {
            self.arm(n);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        for Reverse(w) in self.heap.get_mut().drain() {
            complete_deferred(w.io, IoStatus::Aborted);
        }
    }
}

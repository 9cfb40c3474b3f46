//! Timers for local tasks: `sleep` and `interval`.

use crate::clock::{duration_to_ticks, ticks};
use crate::local;
use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

struct Slot {
    fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

struct Entry {
    deadline: u64,
    seq: u64,
    slot: Rc<Slot>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.seq) == (o.deadline, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.deadline, self.seq).cmp(&(o.deadline, o.seq))
    }
}

#[derive(Default)]
pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    seq: Cell<u64>,
}

impl Timers {
    fn add(&self, deadline: u64, slot: Rc<Slot>) {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        self.heap.borrow_mut().push(Reverse(Entry {
            deadline,
            seq,
            slot,
        }));
    }

    /// Wakes every timer due at `now`.
    #[inline]
    pub(crate) fn fire(&self, now: u64) -> bool {
        let mut any = false;
        loop {
            let slot = {
                let mut h = self.heap.borrow_mut();
                match h.peek() {
                    Some(Reverse(e)) if e.deadline <= now => h.pop().map(|Reverse(e)| e.slot),
                    _ => None,
                }
            };
            let Some(slot) = slot else { break };
            slot.fired.set(true);
            if let Some(w) = slot.waker.borrow_mut().take() {
                w.wake();
            }
            any = true;
        }
        any
    }

    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.heap.borrow().peek().map(|Reverse(e)| e.deadline)
    }

    pub(crate) fn clear(&self) {
        self.heap.borrow_mut().clear();
    }
}

/// A future that completes after a duration; must be polled on a reactor.
pub struct Sleep {
    deadline: u64,
    slot: Option<Rc<Slot>>,
}

/// Sleeps for `d` on the current reactor.
pub fn sleep(d: Duration) -> Sleep {
    Sleep {
        deadline: ticks() + duration_to_ticks(d),
        slot: None,
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(s) = &self.slot {
            if s.fired.get() {
                return Poll::Ready(());
            }
            *s.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if ticks() >= self.deadline {
            return Poll::Ready(());
        }
        let slot = Rc::new(Slot {
            fired: Cell::new(false),
            waker: RefCell::new(Some(cx.waker().clone())),
        });
        let deadline = self.deadline;
        local::with(|r| r.timers.add(deadline, slot.clone()));
        self.slot = Some(slot);
        Poll::Pending
    }
}

/// A periodic timer: `tick().await` completes once per period (missed ticks are skipped).
pub struct Interval {
    period: u64,
    next: u64,
}

/// Creates an interval whose first tick is one period from now.
pub fn interval(period: Duration) -> Interval {
    let p = duration_to_ticks(period).max(1);
    Interval {
        period: p,
        next: ticks() + p,
    }
}

impl Interval {
    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        let now = ticks();
        if self.next > now {
            Sleep {
                deadline: self.next,
                slot: None,
            }
            .await;
        }
        let now = ticks();
        self.next += self.period;
        if self.next <= now {
            self.next = now + self.period;
        }
    }
}

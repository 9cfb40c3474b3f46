//! Rings: bounded single-producer, single-consumer queues into a reactor, for
//! a stream of small items between two reactors (forwarded requests and their
//! completions). Unlike a message ([`RuntimeHandle::send`]), an item allocates
//! nothing and costs no atomic read-modify-write: the ring's indices are plain
//! stores and loads, and the sender only rings the target's doorbell, which
//! writes its eventfd when the target is parked.

use crate::error::ReactorError;
use crate::poller::{register_poller, PollStatus, WeakPollerHandle};
use crate::runtime::{ReactorShared, RuntimeHandle};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Most items one poll of a ring hands to its handler.
const DRAIN_BATCH: usize = 128;

/// The sending end of a ring into a reactor. Dropping it closes the ring: the
/// target handles what is left, then drops its handler.
pub struct RingSender<T> {
    tx: rtrb::Producer<T>,
    target: Arc<ReactorShared>,
}

impl<T> RingSender<T> {
    /// Queues `item` for the target reactor's handler; hands it back when the
    /// ring is full or the target reactor has stopped.
    #[inline]
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.target.exited.load(Ordering::Acquire) {
            return Err(item);
        }
        match self.tx.push(item) {
            Ok(()) => {
                // Release: a reactor that sees the bell (Acquire) sees the item.
                self.target.ring_bell.store(true, Ordering::Release);
                self.target.notifier.notify();
                Ok(())
            }
            Err(rtrb::PushError::Full(item)) => Err(item),
        }
    }

    /// The index of the reactor this ring goes to.
    pub fn target(&self) -> usize {
        self.target.index
    }
}

impl RuntimeHandle {
    /// Opens a ring of at least `capacity` items into reactor `index`. There,
    /// `make_handler` is called once (so the handler may hold reactor-local
    /// state) and then every item is handed to the handler, in order, from a
    /// poller. Items pushed before the handler is in place wait in the ring.
    pub fn ring_to<T, F, H>(
        &self,
        index: usize,
        capacity: usize,
        make_handler: F,
    ) -> Result<RingSender<T>, ReactorError>
    where
        T: Send + 'static,
        F: FnOnce() -> H + Send + 'static,
        H: FnMut(T) + 'static,
    {
        let target = self
            .shared
            .reactors
            .get(index)
            .cloned()
            .ok_or(ReactorError::NoSuchReactor(index))?;
        let (tx, rx) = rtrb::RingBuffer::new(capacity.max(1));
        self.send(index, move || drain_into(rx, make_handler()))?;
        Ok(RingSender { tx, target })
    }
}

/// Opens a ring of at least `capacity` items into the current reactor, whose
/// items `handler` takes here (for an answer ring: the handler may hold this
/// reactor's local state).
///
/// # Panics
/// Off a reactor thread (a programming error).
pub fn ring_here<T, H>(capacity: usize, handler: H) -> RingSender<T>
where
    T: Send + 'static,
    H: FnMut(T) + 'static,
{
    let target = crate::local::with(|r| r.shared.clone());
    let (tx, rx) = rtrb::RingBuffer::new(capacity.max(1));
    drain_into(rx, handler);
    RingSender { tx, target }
}

/// Registers the poller that empties `rx` into `handler` until the sender is
/// gone and the ring is empty.
fn drain_into<T: 'static>(mut rx: rtrb::Consumer<T>, mut handler: impl FnMut(T) + 'static) {
    let me: Rc<RefCell<Option<WeakPollerHandle>>> = Rc::new(RefCell::new(None));
    let me2 = me.clone();
    let h = register_poller("ring", move || {
        let mut n = 0;
        while n < DRAIN_BATCH {
            match rx.pop() {
                Ok(item) => {
                    handler(item);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        if !rx.is_empty() {
            // More than a batch: a stopping reactor must come back for them.
            crate::local::with(|r| r.ring_backlog.set(true));
        }
        if n == 0 && rx.is_abandoned() && rx.is_empty() {
            if let Some(h) = me2.borrow_mut().take() {
                h.unregister();
            }
        }
        PollStatus::from(n > 0)
    });
    *me.borrow_mut() = Some(h.downgrade());
}

//! Owner-reactor synchronisation: per-cluster allocation locks and a drain of
//! in-flight in-place I/O (so a freed cluster is not reused under a running I/O).

use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Per-guest-cluster locks: at most one allocation (or populate) per cluster at a time.
#[derive(Default)]
pub(crate) struct ClusterLocks {
    held: RefCell<HashMap<u64, Vec<oneshot::Sender<()>>>>,
}

/// A held cluster lock; released (waking waiters) on drop.
pub(crate) struct ClusterGuard {
    locks: Rc<ClusterLocks>,
    cluster: u64,
}

impl ClusterLocks {
    /// Waits for and takes the lock of guest cluster `cluster`.
    pub(crate) async fn lock(self: &Rc<Self>, cluster: u64) -> ClusterGuard {
        loop {
            let rx = {
                let mut m = self.held.borrow_mut();
                match m.get_mut(&cluster) {
                    None => {
                        m.insert(cluster, Vec::new());
                        return ClusterGuard {
                            locks: self.clone(),
                            cluster,
                        };
                    }
                    Some(waiters) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        rx
                    }
                }
            };
            let _ = rx.await;
        }
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if let Some(waiters) = self.locks.held.borrow_mut().remove(&self.cluster) {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }
}

/// Counts in-flight I/O to host clusters in two generations; [`Drain::drain`]
/// waits until every I/O that started before it has finished.
#[derive(Default)]
pub(crate) struct Drain {
    gen: Cell<usize>,
    count: [Cell<usize>; 2],
    waker: RefCell<Option<Waker>>,
}

/// One in-flight I/O, counted until dropped.
pub(crate) struct DrainGuard {
    drain: Rc<Drain>,
    slot: usize,
}

impl Drain {
    /// Counts one I/O in the current generation.
    pub(crate) fn enter(self: &Rc<Self>) -> DrainGuard {
        let slot = self.gen.get();
        self.count[slot].set(self.count[slot].get() + 1);
        DrainGuard {
            drain: self.clone(),
            slot,
        }
    }

    /// Starts a new generation and waits for the previous one to finish.
    /// Only one drain may run at a time (callers hold the metadata lock).
    pub(crate) async fn drain(&self) {
        let old = self.gen.get();
        self.gen.set(1 - old);
        poll_fn(|cx| {
            if self.count[old].get() == 0 {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        let c = &self.drain.count[self.slot];
        c.set(c.get() - 1);
        if c.get() == 0 {
            if let Some(w) = self.drain.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

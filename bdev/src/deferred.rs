//! Completing a request on a later reactor iteration (never inside `submit`),
//! through one per-reactor queue and poller; no allocation in steady state.

use crate::io::{BdevIo, IoStatus};
use reactor::{register_poller, PollStatus};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

thread_local! {
    static QUEUE: RefCell<VecDeque<Box<BdevIo>>> = RefCell::new(VecDeque::with_capacity(1024));
    static SWAP: RefCell<VecDeque<Box<BdevIo>>> = RefCell::new(VecDeque::with_capacity(1024));
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Completes `io` with `status` on a later iteration of the current reactor.
#[inline]
pub fn complete_deferred(mut io: Box<BdevIo>, status: IoStatus) {
    io.status = status;
    if !REGISTERED.with(|r| r.replace(true)) {
        register_poller("bdev_deferred_completions", poll);
    }
    QUEUE.with(|q| q.borrow_mut().push_back(io));
}

fn poll() -> PollStatus {
    // Swap the queue out so completions that submit (and defer) again land in the
    // next round instead of looping forever here.
    let mut batch = SWAP.with(|s| std::mem::take(&mut *s.borrow_mut()));
    QUEUE.with(|q| std::mem::swap(&mut *q.borrow_mut(), &mut batch));
    if batch.is_empty() {
        SWAP.with(|s| *s.borrow_mut() = batch);
        return PollStatus::Idle;
    }
    while let Some(io) = batch.pop_front() {
        let st = io.status;
        io.complete(st);
    }
    SWAP.with(|s| *s.borrow_mut() = batch);
    PollStatus::Busy
}

//! A controller's I/O queue pair on one reactor: the poller that rings
//! doorbells, reaps completions and watches for timeouts, the channel through
//! which namespace bdevs submit, and the steps a reset or detach runs on each
//! reactor (pause, take back, resume, fail, remove). Lock-free: everything here
//! is touched only by its reactor.

use super::ctrlr::Controller;
use super::error::NvmeError;
use super::queue::{NsParams, QueuePair, TimeoutAction};
use crate::bdev::Channel;
use crate::error::BdevError;
use crate::io::{BdevIo, IoStatus};
use reactor::{AwakeGuard, PollStatus, PollerHandle};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Failed,
}

/// One reactor's queue pair of one controller.
pub(crate) struct Host {
    ctrlr: Arc<Controller>,
    qp: RefCell<QueuePair>,
    state: Cell<State>,
    pending: RefCell<VecDeque<(Box<BdevIo>, NsParams)>>,
    waiters: RefCell<Vec<Box<dyn FnOnce()>>>,
    awake: RefCell<Option<AwakeGuard>>,
    poller: RefCell<Option<PollerHandle>>,
    // Boxes: requests are owned as Box<BdevIo> throughout the bdev API.
    #[allow(clippy::vec_box)]
    done: RefCell<Vec<Box<BdevIo>>>,
    actions: RefCell<Vec<TimeoutAction>>,
}

thread_local! {
    static HOSTS: RefCell<HashMap<u64, Rc<Host>>> = RefCell::new(HashMap::new());
}

fn get(id: u64) -> Option<Rc<Host>> {
    HOSTS.with(|h| h.borrow().get(&id).cloned())
}

/// Moves queue pair `i` to reactor `i` and starts its poller there.
pub(crate) fn install(ctrlr: &Arc<Controller>, qps: Vec<QueuePair>) -> Result<(), NvmeError> {
    let rt = ctrlr.runtime().clone();
    for (i, qp) in qps.into_iter().enumerate() {
        let c = ctrlr.clone();
        rt.call_on(i, move || {
            let cap = qp.entries() as usize;
            let host = Rc::new(Host {
                ctrlr: c.clone(),
                qp: RefCell::new(qp),
                state: Cell::new(State::Running),
                pending: RefCell::new(VecDeque::new()),
                waiters: RefCell::new(Vec::new()),
                awake: RefCell::new(None),
                poller: RefCell::new(None),
                done: RefCell::new(Vec::with_capacity(cap)),
                actions: RefCell::new(Vec::new()),
            });
            let h = host.clone();
            let name = format!("nvme_poll_{}", c.name());
            *host.poller.borrow_mut() = Some(reactor::register_poller(&name, move || h.poll()));
            HOSTS.with(|m| m.borrow_mut().insert(c.id(), host));
        })
        .block()
        .map_err(|e| {
            NvmeError::Controller(format!("installing the queue pair on reactor {i}: {e:?}"))
        })?;
    }
    Ok(())
}

impl Host {
    fn stay_awake(&self) {
        let mut a = self.awake.borrow_mut();
        if a.is_none() {
            *a = Some(reactor::keep_awake());
        }
    }

    #[inline]
    fn submit(&self, io: Box<BdevIo>, ns: &NsParams) -> Result<(), Box<BdevIo>> {
        match self.state.get() {
            State::Running => {
                if !self.pending.borrow().is_empty() {
                    // Keep order behind requests waiting for a retry.
                    self.pending.borrow_mut().push_back((io, *ns));
                } else {
                    self.qp.borrow_mut().submit_io(io, ns, reactor::ticks())?;
                }
            }
            State::Paused => self.pending.borrow_mut().push_back((io, *ns)),
            State::Failed => crate::complete_deferred(io, IoStatus::Eio),
        }
        self.stay_awake();
        Ok(())
    }

    fn poll(&self) -> PollStatus {
        if self.state.get() != State::Running {
            return PollStatus::Idle;
        }
        let mut batch = std::mem::take(&mut *self.done.borrow_mut());
        let mut actions = std::mem::take(&mut *self.actions.borrow_mut());
        let (reaped, idle) = {
            let mut qp = self.qp.borrow_mut();
            qp.ring();
            let budget = qp.entries() as usize;
            let n = qp.process_completions(budget);
            qp.take_done(&mut batch);
            qp.check_timeouts(reactor::ticks(), &mut actions);
            (n, qp.inflight() == 0)
        };
        let busy = reaped > 0 || !batch.is_empty();
        for io in batch.drain(..) {
            let st = io.status;
            io.complete(st);
        }
        *self.done.borrow_mut() = batch;
        for a in actions.drain(..) {
            match a {
                TimeoutAction::Abort { sqid, cid } => self.ctrlr.request_abort(sqid, cid),
                TimeoutAction::Reset => self.ctrlr.request_reset(),
            }
        }
        *self.actions.borrow_mut() = actions;
        let resubmitted = self.drain_pending();
        if !self.waiters.borrow().is_empty() && self.qp.borrow().free_slots() > 0 {
            let ws = std::mem::take(&mut *self.waiters.borrow_mut());
            for w in ws {
                w();
            }
        }
        if idle
            && !resubmitted
            && self.pending.borrow().is_empty()
            && self.qp.borrow().inflight() == 0
        {
            self.awake.borrow_mut().take();
        }
        PollStatus::from(busy || resubmitted)
    }

    /// Submits queued requests while there is room; returns whether any went out.
    fn drain_pending(&self) -> bool {
        let mut any = false;
        loop {
            let Some((io, ns)) = self.pending.borrow_mut().pop_front() else {
                break;
            };
            let r = self.qp.borrow_mut().submit_io(io, &ns, reactor::ticks());
            match r {
                Ok(()) => any = true,
                Err(io) => {
                    self.pending.borrow_mut().push_front((io, ns));
                    break;
                }
            }
        }
        any
    }

    fn fail_all(&self, st: IoStatus) {
        let mut ios = Vec::new();
        let mut finished = Vec::new();
        {
            let mut qp = self.qp.borrow_mut();
            qp.reset_rings(&mut ios);
            qp.take_done(&mut finished);
        }
        ios.extend(self.pending.borrow_mut().drain(..));
        for io in finished {
            let s = io.status;
            io.complete(s);
        }
        for (io, _) in ios {
            io.complete(st);
        }
        let ws = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in ws {
            w();
        }
        self.awake.borrow_mut().take();
    }
}

/// Reset/detach step on each reactor: stop submitting to the device.
pub(crate) fn pause(id: u64) {
    if let Some(h) = get(id) {
        if h.state.get() == State::Running {
            h.state.set(State::Paused);
        }
    }
}

/// Reset/detach step, after the controller is disabled: take every outstanding
/// request back (to be retried) and clear the rings.
pub(crate) fn take_back(id: u64) {
    if let Some(h) = get(id) {
        let mut ios = Vec::new();
        h.qp.borrow_mut().reset_rings(&mut ios);
        let mut p = h.pending.borrow_mut();
        // Retried requests go first, in their original order.
        for item in ios.into_iter().rev() {
            p.push_front(item);
        }
    }
}

/// Reset step after the queues exist again: resubmit and poll.
pub(crate) fn resume(id: u64) {
    if let Some(h) = get(id) {
        if h.state.get() == State::Paused {
            h.state.set(State::Running);
            h.stay_awake();
        }
    }
}

/// Failed reset: every request fails with EIO, and so will later ones.
pub(crate) fn fail(id: u64) {
    if let Some(h) = get(id) {
        h.state.set(State::Failed);
        h.fail_all(IoStatus::Eio);
    }
}

/// Detach: fail what is left with `Aborted` and drop the queue pair.
pub(crate) fn remove(id: u64) {
    if let Some(h) = HOSTS.with(|m| m.borrow_mut().remove(&id)) {
        h.state.set(State::Failed);
        h.fail_all(IoStatus::Aborted);
        if let Some(p) = h.poller.borrow_mut().take() {
            p.unregister();
        }
    }
}

/// A namespace bdev's channel on one reactor: the reactor's queue pair.
pub(crate) struct NvmeChannel {
    host: Rc<Host>,
    ns: NsParams,
}

impl NvmeChannel {
    /// The channel of namespace `ns` of controller `id` on this reactor.
    pub(crate) fn new(id: u64, ns: NsParams) -> Result<Self, BdevError> {
        let host = get(id).ok_or_else(|| {
            BdevError::Unsupported(
                "the NVMe controller has no queue pair on this reactor (detached?)".into(),
            )
        })?;
        Ok(Self { host, ns })
    }
}

impl Channel for NvmeChannel {
    #[inline]
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        self.host.submit(io, &self.ns)
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.host.waiters.borrow_mut().push(f);
    }
}

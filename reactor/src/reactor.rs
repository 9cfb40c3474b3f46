//! The reactor loop.

use crate::clock::{duration_to_ticks, ticks, ticks_hz};
use crate::error::ReactorError;
use crate::executor::Executor;
use crate::local::{self, LocalReactor};
use crate::notify::Parker;
use crate::poller::PollerSet;
use crate::runtime::{ReactorShared, RuntimeHandle};
use crate::stats::ReactorStats;
use crate::timer::Timers;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

/// Loop counters, written only by the owning reactor.
#[derive(Default)]
pub(crate) struct Counters {
    busy: Cell<u64>,
    idle: Cell<u64>,
    iterations: Cell<u64>,
    parks: Cell<u64>,
    messages: Cell<u64>,
}

impl Counters {
    pub(crate) fn parks(&self) -> u64 {
        self.parks.get()
    }
}

#[inline(always)]
fn add(c: &Cell<u64>, v: u64) {
    c.set(c.get() + v);
}

pub(crate) fn local_stats() -> ReactorStats {
    local::with(|r| ReactorStats {
        index: r.shared.index,
        core: r.shared.core,
        busy_ticks: r.counters.busy.get(),
        idle_ticks: r.counters.idle.get(),
        iterations: r.counters.iterations.get(),
        parks: r.counters.parks.get(),
        messages: r.counters.messages.get(),
        tasks: r.executor.len(),
        tick_rate: ticks_hz(),
        pollers: r.pollers.stats(),
    })
}

pub(crate) fn run(
    rt: RuntimeHandle,
    shared: Arc<ReactorShared>,
    ready: Sender<Result<(), ReactorError>>,
) {
    let core = shared.core;
    if rt.config().pin && !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!(core, "could not pin reactor thread to its core");
    }
    let parker = match Parker::new(&shared.notifier) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(ReactorError::Start {
                core,
                msg: e.to_string(),
            }));
            return;
        }
    };
    let local = Rc::new(LocalReactor {
        shared: shared.clone(),
        runtime: rt.clone(),
        pollers: PollerSet::default(),
        executor: Executor::new(),
        timers: Timers::default(),
        parker,
        awake_holds: Cell::new(0),
        ring_backlog: Cell::new(false),
        counters: Counters::default(),
    });
    local::set(Some(local.clone()));
    let _ = ready.send(Ok(()));
    drop(ready);
    run_loop(&local, &rt);
    // Ring senders refuse items from now on (nothing would take them).
    shared.exited.store(true, Ordering::Release);
    local.executor.clear();
    local.pollers.clear();
    local.timers.clear();
    while let Some(m) = shared.inbox.pop() {
        drop(m);
    }
    local::set(None);
    tracing::debug!(core, "reactor exited");
}

fn run_loop(r: &LocalReactor, rt: &RuntimeHandle) {
    let cfg = rt.config();
    let park_after = duration_to_ticks(cfg.idle_before_park);
    let msg_batch = cfg.message_batch;
    let task_batch = cfg.task_batch;
    let c = &r.counters;
    let sub_ms = duration_to_ticks(Duration::from_millis(1));
    let mut last = ticks();
    let mut idle_since: Option<u64> = None;
    let mut stop_deadline: Option<u64> = None;
    loop {
        let mut busy = false;
        r.ring_backlog.set(false);
        let mut n = 0;
        while n < msg_batch {
            match r.shared.inbox.pop() {
                Some(m) => {
                    m();
                    n += 1;
                }
                None => break,
            }
        }
        if n > 0 {
            busy = true;
            add(&c.messages, n as u64);
        }
        busy |= r.pollers.run_active();
        busy |= r.pollers.run_timed(last);
        busy |= r.timers.fire(last);
        busy |= r.executor.run_ready(task_batch);
        r.pollers.sweep();
        // One clock read per iteration: it ends this iteration's accounting and is
        // "now" for the next iteration's timers.
        let end = ticks();
        if busy {
            add(&c.busy, end - last);
        } else {
            add(&c.idle, end - last);
        }
        last = end;
        add(&c.iterations, 1);

        if rt.shared.stopping.load(Ordering::Relaxed) {
            let dl = *stop_deadline.get_or_insert(end + duration_to_ticks(cfg.drain_timeout));
            let drained = r.executor.len() == 0
                && r.shared.inbox.is_empty()
                && !r.ring_backlog.get()
                && r.awake_holds.get() == 0;
            if drained || end >= dl {
                break;
            }
            continue;
        }
        if busy {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert(end);
        if end - since < park_after || r.awake_holds.get() != 0 {
            continue;
        }
        let next = [r.pollers.next_deadline(), r.timers.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        // epoll's timeout has millisecond granularity: keep polling for a timer due sooner.
        if next.is_some_and(|d| d.saturating_sub(end) < sub_ms) {
            continue;
        }
        let timeout = next.map(|d| {
            let t = d.saturating_sub(end);
            Duration::from_nanos((t as u128 * 1_000_000_000 / ticks_hz().max(1) as u128) as u64)
        });
        r.parker.park(&r.shared.notifier, timeout, || {
            !r.shared.inbox.is_empty()
                || r.shared.ring_bell.swap(false, Ordering::Acquire)
                || r.executor.has_ready()
                || rt.shared.stopping.load(Ordering::Relaxed)
        });
        add(&c.parks, 1);
        let after = ticks();
        add(&c.idle, after - last);
        last = after;
        idle_since = None;
    }
}

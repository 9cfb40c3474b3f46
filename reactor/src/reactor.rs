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
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

#[derive(Default, Clone)]
struct Counters {
    busy: u64,
    idle: u64,
    iterations: u64,
    parks: u64,
    messages: u64,
}

thread_local! {
    static COUNTERS: RefCell<Counters> = RefCell::new(Counters::default());
}

pub(crate) fn local_stats() -> ReactorStats {
    let c = COUNTERS.with(|c| c.borrow().clone());
    local::with(|r| ReactorStats {
        index: r.shared.index,
        core: r.shared.core,
        busy_ticks: c.busy,
        idle_ticks: c.idle,
        iterations: c.iterations,
        parks: c.parks,
        messages: c.messages,
        tasks: r.executor.len(),
        tick_rate: ticks_hz(),
        pollers: r.pollers.stats(),
    })
}

pub(crate) fn run(rt: RuntimeHandle, shared: Arc<ReactorShared>, ready: Sender<Result<(), ReactorError>>) {
    let core = shared.core;
    if rt.config().pin && !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!(core, "could not pin reactor thread to its core");
    }
    let parker = match Parker::new(&shared.notifier) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(ReactorError::Start { core, msg: e.to_string() }));
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
    });
    local::set(Some(local.clone()));
    let _ = ready.send(Ok(()));
    drop(ready);
    run_loop(&local, &rt);
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
    let mut last = ticks();
    let mut idle_since: Option<u64> = None;
    let mut stop_deadline: Option<u64> = None;
    let mut c = Counters::default();
    loop {
        let mut busy = false;
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
            c.messages += n as u64;
        }
        busy |= r.pollers.run_active();
        let now = ticks();
        busy |= r.pollers.run_timed(now);
        busy |= r.timers.fire(now);
        busy |= r.executor.run_ready(task_batch);
        r.pollers.sweep();
        let end = ticks();
        if busy {
            c.busy += end - last;
        } else {
            c.idle += end - last;
        }
        last = end;
        c.iterations += 1;
        // Publish counters cheaply every 1024 iterations (and on every idle turn).
        if c.iterations & 1023 == 0 || !busy {
            COUNTERS.with(|g| *g.borrow_mut() = c.clone());
        }

        if rt.shared.stopping.load(Ordering::Relaxed) {
            let dl = *stop_deadline.get_or_insert(end + duration_to_ticks(cfg.drain_timeout));
            let drained = r.executor.len() == 0 && r.shared.inbox.is_empty() && r.awake_holds.get() == 0;
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
        let next = [r.pollers.next_deadline(), r.timers.next_deadline()].into_iter().flatten().min();
        let timeout = next.map(|d| {
            let t = d.saturating_sub(end);
            Duration::from_nanos((t as u128 * 1_000_000_000 / ticks_hz().max(1) as u128) as u64)
        });
        r.parker.park(&r.shared.notifier, timeout, || {
            !r.shared.inbox.is_empty() || r.executor.has_ready() || rt.shared.stopping.load(Ordering::Relaxed)
        });
        c.parks += 1;
        let after = ticks();
        c.idle += after - last;
        last = after;
        idle_since = None;
        COUNTERS.with(|g| *g.borrow_mut() = c.clone());
    }
    COUNTERS.with(|g| *g.borrow_mut() = c);
}

//! The per-reactor executor for local (`!Send`) futures, and join handles.

use crate::local;
use crate::runtime::ReactorShared;
use futures::channel::oneshot;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

struct Slot {
    gen: u64,
    fut: Option<LocalFuture>,
    waker: Waker,
    scheduled: bool,
}

pub(crate) struct Executor {
    tasks: RefCell<Slab<Slot>>,
    ready: RefCell<VecDeque<(usize, u64)>>,
    next_gen: Cell<u64>,
}

struct TaskWaker {
    runtime_id: u64,
    reactor: Arc<ReactorShared>,
    key: usize,
    gen: u64,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let (key, gen) = (self.key, self.gen);
        if local::is_current(self.runtime_id, self.reactor.index) {
            local::with(|r| r.executor.schedule(key, gen));
        } else {
            self.reactor.push(Box::new(move || {
                local::with(|r| r.executor.schedule(key, gen));
            }));
        }
    }
}

impl Executor {
    pub(crate) fn new() -> Self {
        Self {
            tasks: RefCell::new(Slab::new()),
            ready: RefCell::new(VecDeque::new()),
            next_gen: Cell::new(0),
        }
    }

    pub(crate) fn spawn(&self, runtime_id: u64, reactor: &Arc<ReactorShared>, fut: LocalFuture) {
        let gen = self.next_gen.get() + 1;
        self.next_gen.set(gen);
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let key = entry.key();
        let waker = Waker::from(Arc::new(TaskWaker {
            runtime_id,
            reactor: reactor.clone(),
            key,
            gen,
        }));
        entry.insert(Slot {
            gen,
            fut: Some(fut),
            waker,
            scheduled: true,
        });
        self.ready.borrow_mut().push_back((key, gen));
    }

    pub(crate) fn schedule(&self, key: usize, gen: u64) {
        let mut tasks = self.tasks.borrow_mut();
        if let Some(s) = tasks.get_mut(key) {
            if s.gen == gen && !s.scheduled {
                s.scheduled = true;
                self.ready.borrow_mut().push_back((key, gen));
            }
        }
    }

    /// Polls up to `budget` ready tasks. Returns whether any ran.
    #[inline]
    pub(crate) fn run_ready(&self, budget: usize) -> bool {
        let mut ran = false;
        for _ in 0..budget {
            let Some((key, gen)) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            let (mut fut, waker) = {
                let mut tasks = self.tasks.borrow_mut();
                let Some(s) = tasks.get_mut(key) else {
                    continue;
                };
                if s.gen != gen {
                    continue;
                }
                s.scheduled = false;
                let Some(f) = s.fut.take() else { continue };
                (f, s.waker.clone())
            };
            ran = true;
            let mut cx = Context::from_waker(&waker);
            let done = fut.as_mut().poll(&mut cx).is_ready();
            let mut tasks = self.tasks.borrow_mut();
            if done {
                tasks.remove(key);
            } else if let Some(s) = tasks.get_mut(key) {
                s.fut = Some(fut);
            }
        }
        ran
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Drops every task (at reactor exit).
    pub(crate) fn clear(&self) {
        let drained: Vec<Slot> = self.tasks.borrow_mut().drain().collect();
        self.ready.borrow_mut().clear();
        drop(drained);
    }
}

/// Why a [`JoinHandle`] resolved without a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The task was dropped before finishing (the reactor shut down).
    #[error("task was cancelled (reactor shut down)")]
    Cancelled,
    /// The runtime was already stopping and did not take the task.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// No reactor with that index.
    #[error("no reactor with index {0}")]
    NoSuchReactor(usize),
}

/// The result of a spawned task: await it on a reactor, or [`JoinHandle::block`]
/// on a plain thread. Dropping it detaches the task.
pub struct JoinHandle<T> {
    pub(crate) rx: Result<oneshot::Receiver<T>, JoinError>,
}

impl<T> JoinHandle<T> {
    pub(crate) fn failed(e: JoinError) -> Self {
        Self { rx: Err(e) }
    }

    /// Lets the task run on without waiting for its result.
    pub fn detach(self) {}

    /// Blocks the calling (non-reactor) thread until the task finishes.
    pub fn block(self) -> Result<T, JoinError> {
        debug_assert!(
            !local::is_reactor_thread(),
            "JoinHandle::block on a reactor thread would deadlock"
        );
        futures::executor::block_on(self)
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.rx {
            Err(e) => Poll::Ready(Err(e.clone())),
            Ok(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.map_err(|_| JoinError::Cancelled)),
        }
    }
}

pub(crate) fn wrap<F: Future + 'static>(fut: F) -> (LocalFuture, JoinHandle<F::Output>) {
    let (tx, rx) = oneshot::channel();
    let wrapped = async move {
        let v = fut.await;
        let _ = tx.send(v);
    };
    (Box::pin(wrapped), JoinHandle { rx: Ok(rx) })
}

/// Spawns a local (`!Send`) future on the current reactor.
///
/// # Panics
/// When called off a reactor thread (a programming error).
pub fn spawn_local<F: Future + 'static>(fut: F) -> JoinHandle<F::Output> {
    let (f, h) = wrap(fut);
    local::with(|r| r.executor.spawn(r.runtime.id(), &r.shared, f));
    h
}

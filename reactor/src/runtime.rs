//! Starting, addressing and stopping the set of reactors.

use crate::clock::ticks_hz;
use crate::cores::CoreSet;
use crate::error::ReactorError;
use crate::executor::{wrap, JoinError, JoinHandle};
use crate::local;
use crate::notify::Notifier;
use crate::reactor;
use crate::stats::ReactorStats;
use crossbeam_queue::SegQueue;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(crate) type Message = Box<dyn FnOnce() + Send>;

/// The part of a reactor every thread can reach: its inbox and its doorbell.
pub(crate) struct ReactorShared {
    pub(crate) index: usize,
    pub(crate) core: usize,
    pub(crate) inbox: SegQueue<Message>,
    pub(crate) notifier: Notifier,
    /// Set by ring senders after each push (see `ring.rs`), so a reactor about
    /// to park sees items its ring pollers have not taken yet.
    pub(crate) ring_bell: AtomicBool,
    /// Set once the reactor's loop has ended.
    pub(crate) exited: AtomicBool,
}

impl ReactorShared {
    #[inline]
    pub(crate) fn push(&self, m: Message) {
        self.inbox.push(m);
        self.notifier.notify();
    }
}

pub(crate) struct RuntimeShared {
    pub(crate) id: u64,
    pub(crate) reactors: Vec<Arc<ReactorShared>>,
    pub(crate) stopping: AtomicBool,
    pub(crate) config: RuntimeConfig,
    /// Cores for kernel helper threads (io_uring's io-wq): see [`RuntimeHandle::helper_cores`].
    pub(crate) helper_cores: Vec<usize>,
}

/// How to run the reactors.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Cores to run on, one reactor each.
    pub cores: CoreSet,
    /// Pin each reactor thread to its core.
    pub pin: bool,
    /// Idle time after which a reactor parks (pure polling before that).
    pub idle_before_park: Duration,
    /// How long a stopping reactor lets in-flight work finish.
    pub drain_timeout: Duration,
    /// Messages drained per loop iteration.
    pub message_batch: usize,
    /// Local tasks polled per loop iteration.
    pub task_batch: usize,
}

impl RuntimeConfig {
    /// Defaults for a core set.
    pub fn new(cores: CoreSet) -> Self {
        Self {
            cores,
            pin: true,
            idle_before_park: Duration::from_micros(500),
            drain_timeout: Duration::from_millis(700),
            message_batch: 64,
            task_batch: 256,
        }
    }
}

/// A cheap, clonable, `Send` handle to a running runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    pub(crate) shared: Arc<RuntimeShared>,
}

static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

/// The reactors of one process.
pub struct Runtime {
    handle: RuntimeHandle,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Runtime {
    /// Validates the cores and starts one pinned reactor thread per core.
    pub fn start(config: RuntimeConfig) -> Result<Runtime, ReactorError> {
        config.cores.validate()?;
        let _ = ticks_hz();
        let mut reactors = Vec::new();
        for (index, &core) in config.cores.cores().iter().enumerate() {
            let notifier = Notifier::new().map_err(|e| ReactorError::Start {
                core,
                msg: e.to_string(),
            })?;
            reactors.push(Arc::new(ReactorShared {
                index,
                core,
                inbox: SegQueue::new(),
                notifier,
                ring_bell: AtomicBool::new(false),
                exited: AtomicBool::new(false),
            }));
        }
        let helper_cores = crate::cores::helper_cores(config.cores.cores());
        let shared = Arc::new(RuntimeShared {
            id: NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed),
            reactors,
            stopping: AtomicBool::new(false),
            config,
            helper_cores,
        });
        let handle = RuntimeHandle { shared };
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), ReactorError>>();
        let mut threads = Vec::new();
        for r in &handle.shared.reactors {
            let r = r.clone();
            let h = handle.clone();
            let tx = tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("reactor_{}", r.index))
                .spawn(move || reactor::run(h, r, tx))
                .map_err(|e| ReactorError::Start {
                    core: 0,
                    msg: e.to_string(),
                })?;
            threads.push(t);
        }
        drop(tx);
        let mut rt = Runtime { handle, threads };
        for _ in 0..rt.threads.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    rt.stop_and_join();
                    return Err(e);
                }
                Err(_) => {
                    rt.stop_and_join();
                    return Err(ReactorError::Start {
                        core: 0,
                        msg: "reactor thread died".into(),
                    });
                }
            }
        }
        tracing::info!(cores = ?rt.handle.cores(), "reactors started");
        Ok(rt)
    }

    /// A handle for other threads.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Waits until the runtime is shut down (by [`RuntimeHandle::shutdown`]) and
    /// every reactor has exited.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops the reactors (letting in-flight work finish) and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.handle.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl RuntimeHandle {
    pub(crate) fn id(&self) -> u64 {
        self.shared.id
    }

    /// Number of reactors.
    pub fn num_reactors(&self) -> usize {
        self.shared.reactors.len()
    }

    /// The cores, in reactor order.
    pub fn cores(&self) -> Vec<usize> {
        self.shared.reactors.iter().map(|r| r.core).collect()
    }

    /// Cores where kernel threads working for the reactors (io_uring's io-wq
    /// workers) should run: the cores this process was allowed when the runtime
    /// started, less the reactors' own, or all of them when reactors take every
    /// core. Left alone, io-wq workers inherit the pinning of the reactor that made
    /// the ring and compete with its polling for one core.
    pub fn helper_cores(&self) -> &[usize] {
        &self.shared.helper_cores
    }

    /// The runtime's configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Relaxed)
    }

    /// Runs `f` on reactor `index`. Messages from one sender run in send order.
    pub fn send(
        &self,
        index: usize,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), ReactorError> {
        if self.is_stopping() {
            return Err(ReactorError::ShuttingDown);
        }
        self.send_internal(index, Box::new(f))
    }

    /// Like [`RuntimeHandle::send`] but also during shutdown, for completions of
    /// work already in flight.
    pub fn send_completion(
        &self,
        index: usize,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), ReactorError> {
        self.send_internal(index, Box::new(f))
    }

    fn send_internal(&self, index: usize, m: Message) -> Result<(), ReactorError> {
        let r = self
            .shared
            .reactors
            .get(index)
            .ok_or(ReactorError::NoSuchReactor(index))?;
        r.push(m);
        Ok(())
    }

    /// Builds a local future on reactor `index` with `f` and runs it there.
    pub fn spawn_on<F, Fut>(&self, index: usize, f: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        if self.is_stopping() {
            return JoinHandle::failed(JoinError::ShuttingDown);
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        let rid = self.id();
        let res = self.send_internal(
            index,
            Box::new(move || {
                let (fut, inner) = wrap(f());
                local::with(|r| r.executor.spawn(rid, &r.shared, fut));
                let fwd = async move {
                    if let Ok(v) = inner.await {
                        let _ = tx.send(v);
                    }
                };
                let (fwd, _h) = wrap(fwd);
                local::with(|r| r.executor.spawn(rid, &r.shared, fwd));
            }),
        );
        match res {
            Ok(()) => JoinHandle { rx: Ok(rx) },
            Err(_) => JoinHandle::failed(JoinError::NoSuchReactor(index)),
        }
    }

    /// Runs `f` on reactor `index` and returns its result (a message and a reply).
    pub fn call_on<T: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        if self.is_stopping() {
            return JoinHandle::failed(JoinError::ShuttingDown);
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        match self.send_internal(
            index,
            Box::new(move || {
                let _ = tx.send(f());
            }),
        ) {
            Ok(()) => JoinHandle { rx: Ok(rx) },
            Err(_) => JoinHandle::failed(JoinError::NoSuchReactor(index)),
        }
    }

    /// Collects every reactor's counters (a message to each).
    pub async fn stats(&self) -> Vec<ReactorStats> {
        let all = self.broadcast(reactor::local_stats).await;
        all.into_iter().flatten().collect()
    }

    /// Begins shutdown: reactors stop taking new work, finish what is in flight
    /// (up to the drain timeout) and exit.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for r in &self.shared.reactors {
            r.notifier.wake();
        }
    }
}

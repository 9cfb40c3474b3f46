//! The reactor-local context: what code running on a reactor thread can reach.

use crate::executor::Executor;
use crate::notify::Parker;
use crate::poller::PollerSet;
use crate::runtime::{ReactorShared, RuntimeHandle};
use crate::timer::Timers;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;

pub(crate) struct LocalReactor {
    pub(crate) shared: Arc<ReactorShared>,
    pub(crate) runtime: RuntimeHandle,
    pub(crate) pollers: PollerSet,
    pub(crate) executor: Executor,
    pub(crate) timers: Timers,
    pub(crate) parker: Parker,
    pub(crate) awake_holds: Cell<usize>,
    /// Set by a ring poller that left items in its ring this iteration (a
    /// stopping reactor is not drained while any ring has a backlog).
    pub(crate) ring_backlog: Cell<bool>,
    pub(crate) counters: crate::reactor::Counters,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<LocalReactor>>> = const { RefCell::new(None) };
}

pub(crate) fn set(r: Option<Rc<LocalReactor>>) {
    CURRENT.with(|c| *c.borrow_mut() = r);
}

/// Runs `f` with the current reactor.
///
/// # Panics
/// Off a reactor thread.
#[inline]
pub(crate) fn with<R>(f: impl FnOnce(&LocalReactor) -> R) -> R {
    CURRENT.with(|c| {
        let b = c.borrow();
        let r = b
            .as_ref()
            .expect("this function must be called on a sluice reactor thread");
        f(r)
    })
}

#[inline]
pub(crate) fn try_with<R>(f: impl FnOnce(&LocalReactor) -> R) -> Option<R> {
    CURRENT.with(|c| c.borrow().as_ref().map(|r| f(r)))
}

pub(crate) fn is_current(runtime_id: u64, index: usize) -> bool {
    try_with(|r| r.runtime.id() == runtime_id && r.shared.index == index).unwrap_or(false)
}

/// Whether the calling thread is a reactor.
pub fn is_reactor_thread() -> bool {
    try_with(|_| ()).is_some()
}

/// Index of the current reactor (0 is the main reactor), or `None` off reactors.
pub fn current_index() -> Option<usize> {
    try_with(|r| r.shared.index)
}

/// CPU core of the current reactor, or `None` off reactors.
pub fn current_core() -> Option<usize> {
    try_with(|r| r.shared.core)
}

/// The runtime the current reactor belongs to, or `None` off reactors.
pub fn handle() -> Option<RuntimeHandle> {
    try_with(|r| r.runtime.clone())
}

/// Whether the current reactor's runtime is shutting down (new work should be refused).
pub fn is_stopping() -> bool {
    try_with(|r| r.runtime.is_stopping()).unwrap_or(false)
}

/// How many times the current reactor has parked (0 off reactors). A poller
/// that skips system calls between polls (rate-limited, like the NBD socket
/// harvest) compares it with the count it last saw: a change means the reactor
/// slept since, and a registered fd's edge that woke it may be waiting for
/// that poller's next look, which must then come at once: the edge was
/// consumed by the park, and another will not come for the same readiness.
pub fn parks() -> u64 {
    try_with(|r| r.counters.parks()).unwrap_or(0)
}

/// Adds `fd` to the set whose activity wakes the current reactor from parking
/// (edge-triggered). The caller keeps it open until [`unregister_fd`].
pub fn register_fd(fd: RawFd) -> std::io::Result<()> {
    with(|r| r.parker.add_fd(fd)).map_err(std::io::Error::from)
}

/// Removes `fd` from the wake set.
pub fn unregister_fd(fd: RawFd) -> std::io::Result<()> {
    with(|r| r.parker.remove_fd(fd)).map_err(std::io::Error::from)
}

/// While alive, the current reactor never parks: for drivers that poll hardware
/// with work in flight and no file descriptor to wake on.
pub struct AwakeGuard {
    _not_send: PhantomData<*const ()>,
}

/// Keeps the current reactor from parking until the guard is dropped.
pub fn keep_awake() -> AwakeGuard {
    with(|r| r.awake_holds.set(r.awake_holds.get() + 1));
    AwakeGuard {
        _not_send: PhantomData,
    }
}

impl Drop for AwakeGuard {
    fn drop(&mut self) {
        let _ = try_with(|r| r.awake_holds.set(r.awake_holds.get().saturating_sub(1)));
    }
}

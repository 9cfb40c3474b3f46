//! "Do this on every reactor": one message (or one local task) per reactor,
//! and the answers in reactor order.
//!
//! [`RuntimeHandle::broadcast`] runs a closure on every reactor;
//! [`RuntimeHandle::broadcast_spawn`] builds and runs a local future on every
//! reactor. Both send all their messages at once, when called (not when the
//! result is awaited), so the reactors work in parallel; the returned
//! [`Broadcast`] resolves when every reactor has answered, to one result per
//! reactor, in reactor order (`results[i]` is reactor `i`'s). A reactor that
//! cannot take the work (the runtime is stopping) or drops it (shut down
//! meanwhile) gives an `Err` in its place; the others still run.
//!
//! Awaiting a broadcast on a reactor is fine (the reactor answers its own
//! message once the awaiting task yields); [`Broadcast::block`] is for plain
//! threads, like [`JoinHandle::block`]. Control path only: a broadcast
//! allocates (a box per message).

use crate::executor::{JoinError, JoinHandle};
use crate::local;
use crate::runtime::RuntimeHandle;
use futures::future::JoinAll;
use std::future::{Future, IntoFuture};
use std::sync::Arc;

/// Every reactor's answer to a broadcast: `.await` it (on a reactor or in any
/// async context) or [`Broadcast::block`] on a plain thread. Dropping it lets
/// the work run on without waiting.
#[must_use = "a broadcast runs anyway; await or block on it to wait for the answers"]
pub struct Broadcast<T> {
    handles: Vec<JoinHandle<T>>,
}

impl<T> std::fmt::Debug for Broadcast<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Broadcast({} reactors)", self.handles.len())
    }
}

impl<T> Broadcast<T> {
    /// How many reactors were asked.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether no reactor was asked (a runtime has at least one, so never).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Blocks the calling (non-reactor) thread until every reactor has answered.
    pub fn block(self) -> Vec<Result<T, JoinError>> {
        debug_assert!(
            !local::is_reactor_thread(),
            "Broadcast::block on a reactor thread would deadlock"
        );
        futures::executor::block_on(self.into_future())
    }
}

impl<T> IntoFuture for Broadcast<T> {
    type Output = Vec<Result<T, JoinError>>;
    type IntoFuture = JoinAll<JoinHandle<T>>;
    fn into_future(self) -> Self::IntoFuture {
        futures::future::join_all(self.handles)
    }
}

impl RuntimeHandle {
    /// Runs `f` on every reactor (a message to each, sent now) and gives their
    /// results in reactor order. `f` learns where it runs from
    /// [`crate::current_index`].
    pub fn broadcast<T, F>(&self, f: F) -> Broadcast<T>
    where
        F: Fn() -> T + Send + Sync + 'static,
        T: Send + 'static,
    {
        let f = Arc::new(f);
        let handles = (0..self.num_reactors())
            .map(|i| {
                let f = f.clone();
                self.call_on(i, move || f())
            })
            .collect();
        Broadcast { handles }
    }

    /// Builds a local future with `f` on every reactor (sent now) and runs it
    /// there; gives their outputs in reactor order.
    pub fn broadcast_spawn<F, Fut>(&self, f: F) -> Broadcast<Fut::Output>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let f = Arc::new(f);
        let handles = (0..self.num_reactors())
            .map(|i| {
                let f = f.clone();
                self.spawn_on(i, move || f())
            })
            .collect();
        Broadcast { handles }
    }
}

//! The [`Graph`]: the service's one owner of named nodes.
//!
//! It holds the registry (nodes and their typed claims), the event bus the
//! register/unregister notifications go out on, the records of the nodes the
//! monitor made (`blockdev-add`), and the lock that serialises graph changes.
//! Every node enters through [`Graph::register`] and leaves through
//! [`Graph::delete`]: those two are the only places that publish
//! `bdev_register` / `bdev_unregister`.

use crate::events::EventBus;
use crate::monitor::MonitorTable;
use bdev::{Bdev, BdevError, Claim, Holder, Registry};
use reactor::RuntimeHandle;
use serde_json::json;
use std::sync::{Arc, Mutex, MutexGuard};

/// A bdev was registered (`ctx`: its name).
pub const BDEV_REGISTER: &str = "bdev_register";
/// A bdev was unregistered (`ctx`: its name).
pub const BDEV_UNREGISTER: &str = "bdev_unregister";

/// The block graph of one service.
pub struct Graph {
    rt: RuntimeHandle,
    nodes: Arc<Registry>,
    events: EventBus,
    monitor: Mutex<MonitorTable>,
    change: Mutex<()>,
}

/// Held while the graph changes (see [`Graph::change`]).
pub struct ChangeGuard<'a> {
    _held: MutexGuard<'a, ()>,
}

impl Graph {
    /// An empty graph over the reactors `rt`, publishing on `events`.
    pub fn new(rt: RuntimeHandle, events: EventBus) -> Arc<Graph> {
        Arc::new(Graph {
            rt,
            nodes: Registry::new(),
            events,
            monitor: Mutex::new(MonitorTable::default()),
            change: Mutex::new(()),
        })
    }

    /// The reactors.
    pub fn rt(&self) -> &RuntimeHandle {
        &self.rt
    }

    /// The named nodes and their claims (lookups; registration and deletion
    /// go through [`Graph::register`] and [`Graph::delete`]).
    pub fn nodes(&self) -> &Arc<Registry> {
        &self.nodes
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Serialises graph changes (open, create, delete, snapshot, append,
    /// export of a node): a change checks names, opens, registers or rolls
    /// back all while holding it. Not re-entrant; never taken on a reactor.
    pub fn change(&self) -> ChangeGuard<'_> {
        ChangeGuard {
            _held: self.change.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// [`Graph::change`] for a task on a reactor (a job's final graph
    /// change): waits without blocking the reactor, polling every
    /// millisecond, so that a change in progress on an RPC thread that waits
    /// for this reactor still completes.
    pub async fn change_on_reactor(&self) -> ChangeGuard<'_> {
        loop {
            match self.change.try_lock() {
                Ok(g) => return ChangeGuard { _held: g },
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    return ChangeGuard {
                        _held: p.into_inner(),
                    }
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    reactor::sleep(std::time::Duration::from_millis(1)).await
                }
            }
        }
    }

    /// The records of the nodes the monitor made.
    pub fn monitor(&self) -> MutexGuard<'_, MonitorTable> {
        self.monitor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a node and publishes `bdev_register`; returns its name.
    pub fn register(&self, b: Arc<dyn Bdev>) -> Result<String, BdevError> {
        let name = b.name().to_string();
        self.nodes.register(b)?;
        self.events.publish(BDEV_REGISTER, json!({ "name": name }));
        Ok(name)
    }

    /// Adds a node that `holder` uses at once (as `claim`): both or neither.
    pub fn register_claimed(&self, b: Arc<dyn Bdev>, claim: Claim) -> Result<String, BdevError> {
        let name = b.name().to_string();
        self.nodes.register(b)?;
        if let Err(e) = self.nodes.claim(&name, claim) {
            let _ = self.nodes.unregister(&name);
            return Err(e);
        }
        self.events.publish(BDEV_REGISTER, json!({ "name": name }));
        Ok(name)
    }

    /// Publishes `bdev_register` for nodes a driver registered itself in
    /// [`Graph::nodes`] (an NVMe controller's namespaces).
    pub fn registered_by_driver(&self, names: &[String]) {
        for n in names {
            self.events.publish(BDEV_REGISTER, json!({ "name": n }));
        }
    }

    /// Deletes an unclaimed node: unregisters it, drops every reactor's
    /// channel to it, calls its `on_delete`, and publishes `bdev_unregister`.
    /// Blocks the calling (non-reactor) thread on the reactors.
    pub fn delete(&self, name: &str) -> Result<(), BdevError> {
        self.nodes.delete(name, &self.rt)?;
        self.events
            .publish(BDEV_UNREGISTER, json!({ "name": name }));
        Ok(())
    }

    /// [`Graph::delete`] callable on a reactor: unregisters the node, calls
    /// its `on_delete` and publishes `bdev_unregister`; every reactor drops
    /// its channel to it by message. Returns the bdev.
    pub fn delete_from_reactor(&self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let b = self.nodes.unregister(name)?;
        for i in 0..self.rt.num_reactors() {
            let b2 = b.clone();
            let _ = self
                .rt
                .send_completion(i, move || bdev::drop_cached_channels(&b2));
        }
        b.on_delete();
        self.events
            .publish(BDEV_UNREGISTER, json!({ "name": name }));
        Ok(b)
    }

    /// The end of a node a job released (run on a reactor): unregisters it,
    /// waits until every reactor dropped its channel to it, and publishes
    /// `bdev_unregister`. The caller closes the image; its last reference
    /// ends it (and its image lock). Returns the bdev.
    pub async fn unregister_from_reactor(&self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let b = self.nodes.unregister(name)?;
        let b2 = b.clone();
        // Every reactor at once; a reactor already stopping has no channel left.
        let _ = self
            .rt
            .broadcast(move || bdev::drop_cached_channels(&b2))
            .await;
        self.events
            .publish(BDEV_UNREGISTER, json!({ "name": name }));
        Ok(b)
    }

    /// Publishes `bdev_unregister` for nodes a driver removed itself.
    pub fn unregistered_by_driver(&self, names: &[String]) {
        for n in names {
            self.events.publish(BDEV_UNREGISTER, json!({ "name": n }));
        }
    }

    /// Releases every claim `holder` holds on any node (a node going away).
    pub fn release_all(&self, holder: &Holder) {
        for b in self.nodes.list() {
            while self.nodes.is_claimed_by(b.name(), holder) {
                self.nodes.release(b.name(), holder);
            }
        }
    }
}

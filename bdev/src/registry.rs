//! A registry of named bdevs with typed claims (see [`crate::claim`]).
//!
//! There is no process-wide registry: the block graph (`graph::Graph`) owns
//! one and hands it to the bdevs that claim others by name (a qcow2 image's
//! backing, an error bdev's base, a device's root, NVMe namespaces), so two
//! services can live in one process. Registration, lookup and claims are
//! taken under one mutex; nothing here is on the data path.

use crate::bdev::Bdev;
use crate::claim::{Claim, Holder};
use crate::error::BdevError;
use reactor::RuntimeHandle;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

struct Entry {
    bdev: Arc<dyn Bdev>,
    claims: Vec<Claim>,
}

/// Named bdevs. A claimed bdev (used by a layer above: a qcow2 image, an
/// export, a job) cannot be deleted until every claim is released.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<BTreeMap<String, Entry>>,
    /// Hidden front doors (an export's device) still open: not named, yet
    /// moved with their root by a snapshot.
    hidden: Mutex<Vec<Weak<dyn Bdev>>>,
    /// I/O limits of devices and nodes ([`crate::throttle`]).
    throttles: crate::throttle::Throttles,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The I/O limits of the registry's devices and nodes.
    pub fn throttles(&self) -> &crate::throttle::Throttles {
        &self.throttles
    }

    /// Adds a bdev under its name.
    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<(), BdevError> {
        let mut m = self.lock();
        let name = bdev.name().to_string();
        if name.is_empty() {
            return Err(BdevError::InvalidParam("name: must not be empty".into()));
        }
        if m.contains_key(&name) {
            return Err(BdevError::Exists(name));
        }
        tracing::info!(bdev = %name, "bdev registered");
        m.insert(
            name,
            Entry {
                bdev,
                claims: Vec::new(),
            },
        );
        Ok(())
    }

    /// Looks a bdev up.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        self.lock()
            .get(name)
            .map(|e| e.bdev.clone())
            .ok_or_else(|| BdevError::NotFound(name.into()))
    }

    /// Whether a bdev of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Every bdev, by name.
    pub fn list(&self) -> Vec<Arc<dyn Bdev>> {
        self.lock().values().map(|e| e.bdev.clone()).collect()
    }

    /// Records a hidden front door (see `Device::new_hidden`).
    pub fn add_hidden(&self, b: &Arc<dyn Bdev>) {
        let mut h = self.hidden.lock().unwrap_or_else(|p| p.into_inner());
        h.retain(|w| w.strong_count() > 0);
        h.push(Arc::downgrade(b));
    }

    /// Forgets a hidden front door.
    pub fn remove_hidden(&self, b: &Arc<dyn Bdev>) {
        self.hidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w.strong_count() > 0 && !std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(b)));
    }

    /// The hidden front doors still alive.
    pub fn hidden(&self) -> Vec<Arc<dyn Bdev>> {
        self.hidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Whether `b` itself (not another bdev of its name) is registered.
    pub fn holds(&self, b: &Arc<dyn Bdev>) -> bool {
        self.lock()
            .get(b.name())
            .is_some_and(|e| std::ptr::addr_eq(Arc::as_ptr(&e.bdev), Arc::as_ptr(b)))
    }

    /// Who claims a bdev, as they are shown (`bdev_get_bdevs`, errors).
    pub fn claims(&self, name: &str) -> Vec<String> {
        self.claims_of(name)
            .iter()
            .map(|c| c.holder.to_string())
            .collect()
    }

    /// The claims on a bdev.
    pub fn claims_of(&self, name: &str) -> Vec<Claim> {
        self.lock()
            .get(name)
            .map(|e| e.claims.clone())
            .unwrap_or_default()
    }

    /// Whether `holder` claims `name`.
    pub fn is_claimed_by(&self, name: &str, holder: &Holder) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|e| e.claims.iter().any(|c| &c.holder == holder))
    }

    /// Records `claim` on `name`; returns the bdev. Refused, in QEMU's words
    /// ([`BdevError::PermissionConflict`]), when it conflicts with a claim
    /// already held.
    pub fn claim(&self, name: &str, claim: Claim) -> Result<Arc<dyn Bdev>, BdevError> {
        let mut m = self.lock();
        let e = m
            .get_mut(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        if let Some(msg) = e.claims.iter().find_map(|c| c.conflict(&claim, name)) {
            return Err(BdevError::PermissionConflict(msg));
        }
        e.claims.push(claim);
        Ok(e.bdev.clone())
    }

    /// Releases one claim of `holder` on `name` (no error if absent).
    pub fn release(&self, name: &str, holder: &Holder) {
        let mut m = self.lock();
        if let Some(e) = m.get_mut(name) {
            if let Some(i) = e.claims.iter().position(|c| &c.holder == holder) {
                e.claims.remove(i);
            }
        }
    }

    /// Removes an unclaimed bdev from the registry (channels are released by
    /// [`Registry::delete`]).
    pub fn unregister(&self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let mut m = self.lock();
        let e = m
            .get(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        if !e.claims.is_empty() {
            return Err(BdevError::Claimed {
                name: name.into(),
                by: e
                    .claims
                    .iter()
                    .map(|c| c.holder.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let e = m
            .remove(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        // Limits die with their device or node (SPDK's QoS, QEMU's BlockBackend).
        self.throttles.leave(name);
        tracing::info!(bdev = %name, "bdev unregistered");
        Ok(e.bdev)
    }

    /// Unregisters `name`, drops every reactor's channel to it and calls its
    /// `on_delete`. Blocks the calling (non-reactor) thread on the reactors.
    pub fn delete(&self, name: &str, rt: &RuntimeHandle) -> Result<(), BdevError> {
        let bdev = self.unregister(name)?;
        release_channels(&bdev, rt);
        bdev.on_delete();
        Ok(())
    }
}

/// Drops every reactor's cached channel to `bdev` (blocking the calling thread).
pub fn release_channels(bdev: &Arc<dyn Bdev>, rt: &RuntimeHandle) {
    let b = bdev.clone();
    let _ = rt
        .broadcast(move || crate::channel::drop_cached_channels(&b))
        .block();
}

//! The process-wide registry of named bdevs, with claims.

use crate::bdev::Bdev;
use crate::error::BdevError;
use reactor::RuntimeHandle;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

struct Entry {
    bdev: Arc<dyn Bdev>,
    claims: Vec<String>,
}

/// Named bdevs. A claimed bdev (used by a layer above: a qcow2 image, an
/// export, a job) cannot be deleted until every claim is released.
pub struct Registry {
    inner: Mutex<BTreeMap<String, Entry>>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// The process-wide registry.
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| Registry {
        inner: Mutex::new(BTreeMap::new()),
    })
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Who claims a bdev.
    pub fn claims(&self, name: &str) -> Vec<String> {
        self.lock()
            .get(name)
            .map(|e| e.claims.clone())
            .unwrap_or_default()
    }

    /// Records that `by` uses `name`; returns the bdev.
    pub fn claim(&self, name: &str, by: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let mut m = self.lock();
        let e = m
            .get_mut(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        e.claims.push(by.to_string());
        Ok(e.bdev.clone())
    }

    /// Releases one claim of `by` on `name` (no error if absent).
    pub fn release(&self, name: &str, by: &str) {
        let mut m = self.lock();
        if let Some(e) = m.get_mut(name) {
            if let Some(i) = e.claims.iter().position(|c| c == by) {
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
                by: e.claims.join(", "),
            });
        }
        let e = m
            .remove(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
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

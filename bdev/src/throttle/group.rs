//! A throttle group: one config and its buckets, shared by its members.

use super::bucket::ThrottleState;
use super::config::ThrottleConfig;
use std::sync::Mutex;

/// A named group of limits (QEMU's `throttle-group` object, or the implicit
/// group of one device). Shared across reactors; a reservation takes its
/// mutex for a few arithmetic operations.
pub struct ThrottleGroup {
    name: String,
    state: Mutex<ThrottleState>,
}

impl ThrottleGroup {
    /// A group named `name` with `cfg`.
    pub fn new(name: &str, cfg: ThrottleConfig) -> Self {
        ThrottleGroup {
            name: name.to_string(),
            state: Mutex::new(ThrottleState::new(cfg, super::now_ns())),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its config.
    pub fn config(&self) -> ThrottleConfig {
        *self.lock().config()
    }

    /// Replaces its config (checked by the caller).
    pub fn set_config(&self, cfg: ThrottleConfig) {
        self.lock().set_config(cfg)
    }

    /// Reserves a request of `bytes` now: the nanoseconds it must wait.
    pub fn reserve(&self, is_write: bool, bytes: u64) -> u64 {
        self.lock().reserve(is_write, bytes, super::now_ns())
    }
}

//! What `serve` starts beside the reactors (RPC servers, config replay, exports),
//! and stops before them. Each subsystem adds itself here.

use crate::serve::{ServeArgs, ServeError};
use crate::service::Service;
use std::sync::Arc;

/// Something started at boot that must be stopped before the reactors.
pub trait Subsystem: Send {
    /// Stops accepting work and releases its resources.
    fn stop(self: Box<Self>);
}

/// The started subsystems, stopped in reverse order.
#[derive(Default)]
pub struct Subsystems {
    list: Vec<Box<dyn Subsystem>>,
}

impl Subsystems {
    /// Adds a started subsystem.
    pub fn push(&mut self, s: Box<dyn Subsystem>) {
        self.list.push(s);
    }
    /// Stops every subsystem, last started first.
    pub fn stop(self) {
        for s in self.list.into_iter().rev() {
            s.stop();
        }
    }
}

/// Starts every subsystem for `serve`.
pub fn start(_svc: &Arc<Service>, _args: &ServeArgs) -> Result<Subsystems, ServeError> {
    let subs = Subsystems::default();
    Ok(subs)
}

//! Something a daemon starts beside its reactors (an RPC server, an export)
//! and must stop before them, and the list of those started, stopped in
//! reverse order. The binary decides what to start (`sluice/src/startup.rs`);
//! the servers here implement [`Subsystem`].

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

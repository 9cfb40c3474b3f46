//! sluice's runtime: one pinned reactor thread per core, each running a polling
//! loop of messages, active and timed pollers, timers and local (`!Send`) tasks.
//!
//! A reactor never blocks: cross-reactor work is a message ([`RuntimeHandle::send`];
//! on every reactor at once, [`RuntimeHandle::broadcast`]), never a lock. Under load
//! it spins; after a stretch of idle loops it parks in `epoll_wait` until a
//! message, a timer or a registered file descriptor wakes it.

mod broadcast;
mod clock;
mod cores;
mod error;
mod executor;
mod local;
mod notify;
mod poller;
mod reactor;
mod ring;
mod runtime;
mod stats;
mod timer;

pub use broadcast::Broadcast;
pub use clock::{ticks, ticks_hz, ticks_to_ns};
pub use cores::CoreSet;
pub use error::ReactorError;
pub use executor::{spawn_local, JoinError, JoinHandle};
pub use local::{
    current_core, current_index, handle, is_reactor_thread, is_stopping, keep_awake, parks,
    register_fd, unregister_fd, AwakeGuard,
};
pub use poller::{register_poller, register_timed_poller, PollStatus, PollerHandle};
pub use ring::{ring_here, RingSender};
pub use runtime::{Runtime, RuntimeConfig, RuntimeHandle};
pub use stats::{PollerStats, ReactorStats};
pub use timer::{interval, sleep, Interval, Sleep};

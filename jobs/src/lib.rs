//! sluice block jobs: the job framework (QEMU's state machine and verbs,
//! speed limit, progress, events) and its jobs: the stream job and the 2011
//! streaming API over it.

pub mod job;
pub mod legacy;
pub mod ratelimit;
pub mod stream_job;

/// The event bus, re-exported from the graph layer where it lives.
pub use graph::events;

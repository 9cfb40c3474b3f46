//! sluice block jobs: the job framework, the stream job, snapshots and the event bus.

pub mod events;

//! sluice block jobs: the job framework, the stream job, snapshots and the event bus.

pub mod events;
pub mod job;
pub mod legacy;
pub mod node;
mod qcow2_node;
pub mod qemu_name;
pub mod ratelimit;
pub mod snapshot;
pub mod stream_job;

//! I/O limits: QEMU's leaky buckets (`block/throttle-groups.c`,
//! `util/throttle.c`) shared by every limit sluice has.
//!
//! The contract:
//!
//! - A [`ThrottleConfig`] is QEMU's: six buckets (bytes and operations, in
//!   total, read and write), each with an average rate, an optional burst
//!   rate (`*_max`) and burst length in seconds (`*_max_length`), and
//!   `iops_size` (an operation of `n * iops_size` bytes counts `n`).
//!   [`ThrottleConfig::check`] gives QEMU's `throttle_is_valid` errors, word
//!   for word. SPDK's `bdev_set_qos_limit` limits are the same buckets
//!   ([`ThrottleConfig::from_spdk`]).
//! - A [`ThrottleGroup`] holds one config and the buckets' levels; every
//!   member (a device, a throttle filter node, a job naming the group)
//!   shares them, so the group's limit holds for the members together.
//!   A request *reserves* its place at admission ([`ThrottleGroup::reserve`]):
//!   it is accounted at once and told how long to wait, so requests are
//!   served in arrival order across members and reactors (fair: no reactor
//!   or member can overtake another by polling more often), and the long-run
//!   rate is the configured one exactly (plus QEMU's one-tenth-of-a-second
//!   burst).
//! - A [`Gate`] is one reactor's queue of requests waiting for their time: it
//!   releases them from a timer on that reactor (the reactor never spins on
//!   them and never sleeps), in release-time order.
//! - The [`Throttles`] table (one per [`crate::Registry`]) says which group
//!   limits which device or node, and which groups exist (`object-add
//!   qom-type: throttle-group`, or the implicit group `block_set_io_throttle`
//!   makes). A change bumps its generation, which the data path compares
//!   with one atomic load per request.

mod bucket;
mod config;
mod gate;
mod group;
mod node;
mod table;

pub use bucket::ThrottleState;
pub use config::{BucketKind, BucketLimit, ThrottleConfig, THROTTLE_VALUE_MAX};
pub use gate::Gate;
pub use group::ThrottleGroup;
pub use node::ThrottleBdev;
pub use table::{Membership, Throttles};

/// Nanoseconds now on the reactor clock.
pub fn now_ns() -> u64 {
    reactor::ticks_to_ns(reactor::ticks())
}

/// A group object taken by a user (a throttle node, a job): the object
/// cannot be deleted while this lives.
pub struct GroupUse {
    nodes: std::sync::Arc<crate::Registry>,
    group: std::sync::Arc<ThrottleGroup>,
}

impl GroupUse {
    /// Takes the group object `name` of `nodes`' table; `None`: no such object.
    pub fn new(nodes: &std::sync::Arc<crate::Registry>, name: &str) -> Option<GroupUse> {
        let group = nodes.throttles().use_object(name)?;
        Some(GroupUse {
            nodes: nodes.clone(),
            group,
        })
    }

    /// The group.
    pub fn group(&self) -> &std::sync::Arc<ThrottleGroup> {
        &self.group
    }
}

impl Drop for GroupUse {
    fn drop(&mut self) {
        self.nodes.throttles().unuse(self.group.name());
    }
}

impl std::fmt::Debug for GroupUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupUse({})", self.group.name())
    }
}

//! sluice's block graph: every node's life cycle in one place.
//!
//! # Contract
//!
//! - **One owner.** A [`Graph`] (one per service, handed down explicitly as
//!   `Arc<Graph>`; there is no process-wide registry or state) owns the named
//!   nodes ([`Graph::nodes`]), the records of what the monitor made
//!   ([`monitor`]), and the event bus ([`events`]).
//! - **Enter and leave in one place.** A node is added by
//!   [`Graph::register`] (or [`Graph::register_claimed`]) and removed by
//!   [`Graph::delete`] (or [`Graph::delete_from_reactor`] inside a job); they
//!   alone publish `bdev_register` / `bdev_unregister`. A node that is
//!   claimed cannot be deleted.
//! - **Typed claims.** A user of a node holds a [`bdev::Claim`]: a holder
//!   identity, the role (QEMU's child name), the permissions it takes and
//!   those it shares (QEMU's `BLK_PERM_*`). A claim that conflicts is refused
//!   in QEMU's words ("Conflicts with use by ... as '...', which does not
//!   allow '...' on ..."). Claims are released by holder, never matched as text.
//! - **Serialised changes.** Open, create, delete, snapshot, append and
//!   export of a node run under [`Graph::change`]; a change checks names,
//!   opens and registers (or rolls back) all under it, so a failed or lost
//!   open leaves no node, claim or image lock behind. Never taken on a reactor.
//! - **Image nodes.** What a job needs of an image node ([`node`]), the
//!   backing-file strings QEMU writes ([`qemu_name`]), snapshots onto a new
//!   overlay ([`snapshot`]), and the writer's image lock a backing file
//!   takes while it is written ([`lock::WriterLock`], a guard).

pub mod events;
mod graph;
pub mod lock;
pub mod monitor;
pub mod node;
mod qcow2_node;
pub mod qemu_name;
pub mod snapshot;

pub use graph::{ChangeGuard, Graph, BDEV_REGISTER, BDEV_UNREGISTER};

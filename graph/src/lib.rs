//! sluice's block graph: every node's life cycle in one place.
//!
//! # Contract
//!
//! - **One owner.** A [`Graph`] (one per service, handed down explicitly as
//!   `Arc<Graph>`; there is no process-wide registry or state) owns the named
//!   nodes ([`Graph::nodes`]), the records of what the monitor made
//!   ([`monitor`]), and the event bus ([`events`]).
//! - **Enter and leave in one place.** A node is added by
//!   [`Graph::register`] (or [`Graph::register_claimed`]: node and claim
//!   both or neither) and removed by [`Graph::delete`] (on a reactor:
//!   [`Graph::delete_from_reactor`], or [`Graph::unregister_from_reactor`]
//!   for the images a job releases and closes itself); they alone publish
//!   `bdev_register` / `bdev_unregister` (and, for the namespaces an NVMe
//!   controller registers itself, [`Graph::registered_by_driver`] /
//!   [`Graph::unregistered_by_driver`]). A claimed node cannot be deleted;
//!   a refused delete publishes nothing.
//! - **Typed claims.** A user of a node holds a [`bdev::Claim`]: a holder
//!   identity, the role (QEMU's child name), the permissions it takes and
//!   those it shares (QEMU's `BLK_PERM_*`). A claim that conflicts is refused
//!   in QEMU's words ("Conflicts with use by ... as '...', which does not
//!   allow '...' on ..."). Claims are released by holder, never matched as text.
//! - **Serialised changes.** Open, create, delete, snapshot, append and
//!   export of a node run under [`Graph::change`] (an RPC thread's; never
//!   blocking a reactor: a job's final backing change waits for it with
//!   [`Graph::change_on_reactor`]). A change checks names, opens and
//!   registers, or rolls back, all under it: a failed or lost open leaves no
//!   node, claim or image lock behind.
//! - **Threads.** Every method is callable from any thread; those that
//!   block on the reactors ([`Graph::delete`]) must not run on one.
//! - **Image nodes.** What a job needs of an image node ([`node`]), the
//!   backing-file strings QEMU writes ([`qemu_name`]), snapshots onto a new
//!   overlay ([`snapshot`]), the writer's image lock a backing file
//!   takes while it is written ([`lock::WriterLock`], a guard), and a
//!   read-only node reopened read-write for a job ([`reopen::ReadWrite`]).

pub mod events;
mod graph;
pub mod lock;
pub mod monitor;
pub mod node;
mod qcow2_node;
pub mod qemu_name;
pub mod reopen;
pub mod snapshot;

pub use graph::{ChangeGuard, Graph, BDEV_REGISTER, BDEV_UNREGISTER};

//! sluice's vhost-user-blk export: a guest's virtio-blk device served from
//! the reactors, with the guest's memory shared (memfd regions mapped once) and
//! requests submitted straight from the guest's pages.
//!
//! The contract:
//! - The vhost-user protocol is rust-vmm's (`vhost`'s backend request handler);
//!   the rings are `virtio-queue`'s over `vm-memory`'s mappings. Control runs on
//!   a thread per export ([`server`]); each virtqueue runs on one reactor
//!   (queue *i* of an export on reactor `(first + i) % reactors`), polled there
//!   and woken by its kick eventfd ([`vring`]).
//! - A read or write is one bdev request over the guest's pages
//!   ([`bdev::BdevIo::over_foreign`]): no copy. The request holds the mapping
//!   (an `Arc`) until it completes, so a new memory table or a disconnect never
//!   unmaps pages a request in flight uses.
//! - read, write, flush, discard, write-zeroes and get-id as virtio 1.2 says;
//!   a writeback cache unless the guest turns it off (then writes carry FUA).
//! - Garbage from a front end (bad descriptors, addresses outside its memory,
//!   a queue index out of range, a disconnect mid-request) fails the request
//!   with an error status or drops that connection; nothing panics and the
//!   service, its other exports and their guests go on.
//! - A poll's completions reach the used ring together: their elements, then
//!   one release store of `used.idx`, and the `EVENT_IDX` decision on that
//!   published index (the `used` module).
//! - The used-ring signal may be coalesced as SPDK's is
//!   (`vhost_controller_set_coalescing`, off by default; [`coalesce`]).
//! - An export claims its node as an NBD export does (`Holder::Export`, a
//!   hidden device over a plain node), and so follows it through snapshots,
//!   streams and pivots.

pub mod backend;
pub mod blk;
pub mod coalesce;
mod error;
pub mod memory;
pub mod server;
mod used;
pub mod vring;

pub use error::VublkError;
pub use server::{ExportConfig, ExportInfo, VhostServer};

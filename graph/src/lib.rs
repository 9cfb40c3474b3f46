//! sluice's block graph: what the control plane knows of a node beyond its
//! data path. Image nodes and their chains (`node`), the backing-file strings
//! QEMU writes (`qemu_name`), snapshots onto a new overlay (`snapshot`), and
//! the event bus that every graph change and job publishes on (`events`).

pub mod events;
pub mod node;
mod qcow2_node;
pub mod qemu_name;
pub mod snapshot;

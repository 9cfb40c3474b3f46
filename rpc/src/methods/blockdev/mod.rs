//! QEMU's `blockdev-add`, `blockdev-del` and `blockdev-create` (a job of
//! type `create`, see `create_job`), as qemu-storage-daemon serves them: nodes of the drivers `qcow2`, `raw`, `file`, `host_device` and
//! `null-co`, made through the same code as `bdev_qcow2_open`,
//! `bdev_uring_create` and `bdev_null_create`, and removed only by the
//! monitor that made them.
//!
//! A qcow2 node over a nested `file` (or over a file node the monitor added
//! and nothing else uses) opens its file itself, as `bdev_qcow2_open
//! {filename}` does: the file grows as the image does and is trimmed when the
//! node is deleted. The file node stays a node of its own, named by its
//! `node-name` (`<node>.file` when nested without one). A raw node is a
//! [`bdev::device::Device`] over its file node (a passthrough under its own name).

pub(crate) mod args;
mod create;
mod create_job;
mod create_opts;
mod describe;
pub(crate) mod snapshot;
mod spec;
pub(crate) mod state;

use crate::error::RpcError;
use crate::methods::common::delete_bdev;
use crate::methods::nodes::delete_node;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use args::Args;
use bdev::device::Device;
use bdev::{Bdev, Holder};
use serde_json::{json, Value};
use spec::Driver;
use state::{backing_user, is_raw_node, monitor_owned};
use std::sync::Arc;

/// Registers the methods and the `blockdev` section of `save_config`.
pub fn register(t: &mut MethodTable) {
    t.add("blockdev-add", |svc, p| {
        let v = p.0.unwrap_or(Value::Null);
        let v = if v.is_null() { json!({}) } else { v };
        let _g = svc.graph.change();
        create::add(svc, &v)?;
        Ok(json!({}))
    });
    t.add("blockdev-del", blockdev_del);
    t.add("blockdev-create", |svc, p| {
        let v = p.0.unwrap_or(Value::Null);
        let v = if v.is_null() { json!({}) } else { v };
        create_job::start(svc, &v)?;
        Ok(json!({}))
    });
    t.add_config_section("blockdev", &["bdev"], |svc| {
        state::records(&svc.graph)
            .iter()
            .map(|r| json!({"method": "blockdev-add", "params": create::config_args(svc, r)}))
            .collect()
    });
}

/// How QEMU names a `blockdev-add` node (the describer `graph::qemu_name`
/// asks first).
pub fn describe_node(g: &graph::Graph, b: &Arc<dyn Bdev>) -> Option<graph::qemu_name::QemuNode> {
    // Only this graph's nodes: another service's may have the same name.
    if !g.nodes().holds(b) {
        return None;
    }
    describe::describe(g, b)
}

fn failed_to_find(name: &str) -> RpcError {
    RpcError::errno(
        libc::ENODEV,
        format!("Failed to find node with node-name='{name}'"),
    )
}

/// Why `name` cannot be deleted, in QEMU's order and words.
fn check_deletable(svc: &Service, name: &str) -> Result<Arc<dyn Bdev>, RpcError> {
    let b = svc
        .graph
        .nodes()
        .get(name)
        .map_err(|_| failed_to_find(name))?;
    if Device::from_bdev(&b).is_some() && !is_raw_node(svc, name) {
        // A device is QEMU's block backend, not a node.
        return Err(failed_to_find(name));
    }
    let claims = state::users(&svc.graph, name);
    // QEMU's block backends: an export's, a device's (a raw node is a node).
    let backend = |h: &Holder| match h {
        Holder::Export(_) => true,
        Holder::Device(d) => !is_raw_node(svc, d),
        _ => false,
    };
    if claims.iter().any(backend) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Node {name} is in use"),
        ));
    }
    if let Some(j) = svc.jobs.job_on_node(name) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!(
                "Node '{name}' is busy: block device is in use by block job: {}",
                j.spec().kind.as_str()
            ),
        ));
    }
    // QEMU's op blocker on a backing node (checked before ownership).
    if let Some(user) = backing_user(svc, name) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Node '{name}' is busy: node is used as backing hd of '{user}'"),
        ));
    }
    if !monitor_owned(svc, name) {
        return Err(RpcError::errno(
            libc::EPERM,
            format!("Node {name} is not owned by the monitor"),
        ));
    }
    if !claims.is_empty() {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Block device {name} is in use"),
        ));
    }
    Ok(b)
}

fn blockdev_del(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = p.0.unwrap_or_else(|| json!({}));
    let mut a = Args::new(&v, "")?;
    let name = a.req_str("node-name")?;
    a.finish(&[])?;
    let _g = svc.graph.change();
    delete_monitor_node(svc, &name)?;
    Ok(json!({}))
}

/// `blockdev-del` of `name` under the caller's [`graph::Graph::change`]
/// (also a snapshot's overlay when its `transaction` fails).
pub(crate) fn delete_monitor_node(svc: &Service, name: &str) -> Result<(), RpcError> {
    let name = name.to_string();
    let b = check_deletable(svc, &name)?;
    let rec = state::record(&svc.graph, &name).ok_or_else(|| failed_to_find(&name))?;
    svc.graph.nodes().release(&name, &bdev::Holder::Monitor);
    match rec.driver {
        // Flushed, the file trimmed, the chain from the header closed: the
        // path `bdev_qcow2_delete` takes.
        Driver::Qcow2 => delete_node(svc, b)?,
        _ => delete_bdev(svc, &name)?,
    }
    state::forget(&svc.graph, &name);
    for (c, _) in &rec.children {
        svc.graph.release_all(&bdev::Holder::Node(c.clone()));
        if svc.graph.nodes().contains(c) {
            if let Err(e) = delete_bdev(svc, c) {
                tracing::warn!(node = %c, "deleting the nested node: {e}");
            }
        }
    }
    if let Some(f) = &rec.file_ref {
        if let Some(frec) = state::record(&svc.graph, f) {
            if state::user_claims(&svc.graph, f).is_empty() {
                svc.graph.nodes().release(f, &bdev::Holder::Monitor);
                if let Err(e) = svc.graph.delete(f) {
                    tracing::warn!(node = %f, "closing the image's file: {e}");
                }
                create::restore_file_node(&svc.graph, &frec);
            }
        }
    }
    tracing::info!(node = %name, "blockdev-del");
    Ok(())
}

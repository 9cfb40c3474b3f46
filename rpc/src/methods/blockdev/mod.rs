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

mod args;
mod create;
mod create_job;
mod create_opts;
mod describe;
mod spec;
mod state;

use crate::error::RpcError;
use crate::methods::bdev::delete_bdev;
use crate::methods::qcow2::delete_node;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use args::Args;
use bdev::device::Device;
use bdev::{registry, Bdev};
use serde_json::{json, Value};
use spec::Driver;
use std::sync::Arc;

pub(crate) use snapshot::{snapshot_existing_plain, snapshot_plain_node};
pub(crate) use state::op_lock;

mod snapshot;

/// Registers the methods and the `blockdev` section of `save_config`.
pub fn register(t: &mut MethodTable) {
    graph::qemu_name::register_describer(describe::describe);
    t.add("blockdev-add", |svc, p| {
        let v = p.0.unwrap_or(Value::Null);
        let v = if v.is_null() { json!({}) } else { v };
        let _g = state::op_lock();
        add(svc, &v)?;
        Ok(json!({}))
    });
    t.add("blockdev-del", blockdev_del);
    t.add("blockdev-create", |svc, p| {
        let v = p.0.unwrap_or(Value::Null);
        let v = if v.is_null() { json!({}) } else { v };
        create_job::start(svc, &v)?;
        Ok(json!({}))
    });
    t.add_config_section("blockdev", &["bdev"], |_| {
        state::records()
            .iter()
            .map(|r| json!({"method": "blockdev-add", "params": create::config_args(r)}))
            .collect()
    });
}

/// Whether `name` is a node made by `blockdev-add` at the top level (QEMU:
/// owned by the monitor).
pub fn monitor_owned(name: &str) -> bool {
    state::record(name).is_some()
}

/// Whether the bdev `name` belongs to a `blockdev-add` node (the node or one
/// nested in it): `save_config` recreates it with `blockdev-add`.
pub fn owns(name: &str) -> bool {
    state::is_node(name) && registry().contains(name)
}

/// Whether `name` is a raw node (a device in sluice's terms, a node in QEMU's).
pub fn is_raw_node(name: &str) -> bool {
    state::driver_of(name) == Some(Driver::Raw)
}

/// Adjusts a `BlockDeviceInfo` (`query-named-block-nodes`) to the driver the
/// node was added with.
pub fn annotate(b: &Arc<dyn Bdev>, v: &mut Value) {
    let Some(d) = state::driver_of(b.name()) else {
        return;
    };
    v["drv"] = json!(d.as_str());
    v["image"]["format"] = json!(d.as_str());
    let f = graph::node::filename_of(b);
    v["file"] = json!(f);
    v["image"]["filename"] = json!(f);
    if let Some(direct) = b
        .driver_specific()
        .pointer("/uring/direct")
        .and_then(Value::as_bool)
    {
        v["cache"]["direct"] = json!(direct);
    }
}

/// `blockdev-add`: parses all, checks the names, then creates.
fn add(svc: &Service, v: &Value) -> Result<String, RpcError> {
    let spec = spec::parse(v, "", None)?;
    let Some(name) = spec.common.node_name.clone() else {
        return Err(RpcError::invalid_params(
            "'node-name' must be specified for the root node",
        ));
    };
    create::check_new_name(&name, false)?;
    let made = create::create(svc, &name, &spec)?;
    registry().claim(&name, state::MONITOR_CLAIM)?;
    state::insert(&name, spec.driver, v.clone(), made.children, made.file_ref);
    tracing::info!(node = %name, driver = spec.driver.as_str(), "blockdev-add");
    Ok(name)
}

fn failed_to_find(name: &str) -> RpcError {
    RpcError::errno(
        libc::ENODEV,
        format!("Failed to find node with node-name='{name}'"),
    )
}

/// Why `name` cannot be deleted, in QEMU's order and words.
fn check_deletable(svc: &Service, name: &str) -> Result<Arc<dyn Bdev>, RpcError> {
    let b = registry().get(name).map_err(|_| failed_to_find(name))?;
    if Device::from_bdev(&b).is_some() && !is_raw_node(name) {
        // A device is QEMU's block backend, not a node.
        return Err(failed_to_find(name));
    }
    let claims = state::user_claims(name);
    let backend = |c: &String| {
        c.starts_with("nbd export ") || c.strip_prefix("device ").is_some_and(|d| !is_raw_node(d))
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
    if let Some(user) = backing_user(name) {
        return Err(RpcError::errno(
            libc::EBUSY,
            format!("Node '{name}' is busy: node is used as backing hd of '{user}'"),
        ));
    }
    if !monitor_owned(name) {
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

/// The image node that reads through `name` as its backing, if any.
pub(crate) fn backing_user(name: &str) -> Option<String> {
    state::user_claims(name).into_iter().find(|c| {
        registry()
            .get(c)
            .ok()
            .and_then(|b| graph::node::image(&b))
            .and_then(|i| i.backing())
            .is_some_and(|b| b.name() == name)
    })
}

fn blockdev_del(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = p.0.unwrap_or_else(|| json!({}));
    let mut a = Args::new(&v, "")?;
    let name = a.req_str("node-name")?;
    a.finish(&[])?;
    let _g = state::op_lock();
    let b = check_deletable(svc, &name)?;
    let rec = state::record(&name).ok_or_else(|| failed_to_find(&name))?;
    registry().release(&name, state::MONITOR_CLAIM);
    match rec.driver {
        // Flushed, the file trimmed, the chain from the header closed: the
        // path `bdev_qcow2_delete` takes.
        Driver::Qcow2 => delete_node(svc, b)?,
        _ => delete_bdev(svc, &name)?,
    }
    state::forget(&name);
    for (c, _) in &rec.children {
        for other in registry().list() {
            registry().release(other.name(), c);
        }
        if registry().contains(c) {
            if let Err(e) = delete_bdev(svc, c) {
                tracing::warn!(node = %c, "deleting the nested node: {e}");
            }
        }
    }
    if let Some(f) = &rec.file_ref {
        if let Some(frec) = state::record(f) {
            if state::user_claims(f).is_empty() {
                registry().release(f, state::MONITOR_CLAIM);
                if let Err(e) = registry().delete(f, &svc.rt) {
                    tracing::warn!(node = %f, "closing the image's file: {e}");
                }
                create::restore_file_node(&frec);
            }
        }
    }
    tracing::info!(node = %name, "blockdev-del");
    Ok(json!({}))
}

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
mod delete;
mod describe;
pub(crate) mod snapshot;
mod spec;
pub(crate) mod state;

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use args::Args;
use bdev::Bdev;
use serde_json::{json, Value};
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

fn blockdev_del(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = p.0.unwrap_or_else(|| json!({}));
    let mut a = Args::new(&v, "")?;
    let name = a.req_str("node-name")?;
    a.finish(&[])?;
    let _g = svc.graph.change();
    delete::delete_monitor_node(svc, &name)?;
    Ok(json!({}))
}

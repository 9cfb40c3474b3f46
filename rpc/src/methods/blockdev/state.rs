//! Which nodes `blockdev-add` made (QEMU's "owned by the monitor"): the
//! records live in the service's [`graph::Graph`] (its monitor table); these
//! helpers read them together with the registry.

use super::spec::Driver;
use crate::service::Service;
use bdev::Bdev;
use bdev::Holder;
use graph::Graph;
use serde_json::json;
use serde_json::Value;
use std::sync::Arc;

pub use graph::monitor::Record;

/// Who uses `name`, the monitor's own claim left out.
pub fn users(g: &Graph, name: &str) -> Vec<Holder> {
    g.nodes()
        .claims_of(name)
        .into_iter()
        .map(|c| c.holder)
        .filter(|h| *h != Holder::Monitor)
        .collect()
}

/// [`users`] as they are shown.
pub fn user_claims(g: &Graph, name: &str) -> Vec<String> {
    users(g, name).iter().map(Holder::to_string).collect()
}

/// Records a new node.
pub fn insert(
    g: &Graph,
    name: &str,
    driver: Driver,
    args: Value,
    children: Vec<(String, Driver)>,
    file_ref: Option<String>,
) {
    g.monitor().insert(name, driver, args, children, file_ref)
}

/// Records that the node `name` now reads through `backing` (a
/// `blockdev-snapshot` linked it), so `save_config` re-adds it that way.
pub fn set_backing(g: &Graph, name: &str, backing: &str) {
    g.monitor().set_backing(name, backing)
}

/// Forgets a node.
pub fn forget(g: &Graph, name: &str) {
    g.monitor().forget(name)
}

/// The record of a node made by `blockdev-add` (a node since deleted by
/// other means, `bdev_*_delete`, has none).
pub fn record(g: &Graph, name: &str) -> Option<Record> {
    let r = g.monitor().get(name);
    r.filter(|_| g.nodes().contains(name))
}

/// Every record of a node still registered, oldest first.
pub fn records(g: &Graph) -> Vec<Record> {
    let mut v = g.monitor().all();
    v.retain(|r| g.nodes().contains(&r.name));
    v
}

/// The options a node made by `blockdev-add` was given: its own arguments,
/// or for a node nested in one, the parent's `file` member.
pub fn args_of(g: &Graph, name: &str) -> Option<Value> {
    g.monitor().args_of(name)
}

/// The driver of a node made by `blockdev-add` or nested in one.
pub fn driver_of(g: &Graph, name: &str) -> Option<Driver> {
    g.monitor().driver_of(name)
}

/// Whether `name` is a node `blockdev-add` made (at the top or nested).
pub fn is_node(g: &Graph, name: &str) -> bool {
    driver_of(g, name).is_some()
}

/// Whether `name` is a node made by `blockdev-add` at the top level (QEMU:
/// owned by the monitor).
pub fn monitor_owned(svc: &Service, name: &str) -> bool {
    record(&svc.graph, name).is_some()
}

/// Whether the bdev `name` belongs to a `blockdev-add` node (the node or one
/// nested in it): `save_config` recreates it with `blockdev-add`.
pub fn owns(svc: &Service, name: &str) -> bool {
    is_node(&svc.graph, name) && svc.graph.nodes().contains(name)
}

/// Whether `name` is a raw node (a device in sluice's terms, a node in QEMU's).
pub fn is_raw_node(svc: &Service, name: &str) -> bool {
    driver_of(&svc.graph, name) == Some(Driver::Raw)
}

/// Adjusts a `BlockDeviceInfo` (`query-named-block-nodes`) to the driver the
/// node was added with.
pub fn annotate(svc: &Service, b: &Arc<dyn Bdev>, v: &mut Value) {
    let Some(d) = driver_of(&svc.graph, b.name()) else {
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

/// The image node that reads through `name` as its backing, if any.
pub(crate) fn backing_user(svc: &Service, name: &str) -> Option<String> {
    users(&svc.graph, name)
        .into_iter()
        .filter_map(|h| match h {
            Holder::Node(n) => Some(n),
            _ => None,
        })
        .find(|n| {
            svc.graph
                .nodes()
                .get(n)
                .ok()
                .and_then(|b| graph::node::image(&b))
                .and_then(|i| i.backing())
                .is_some_and(|b| b.name() == name)
        })
}

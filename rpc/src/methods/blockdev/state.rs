//! Which nodes `blockdev-add` made (QEMU's "owned by the monitor"), with what
//! arguments, and the nested nodes made with each.

use super::spec::Driver;
use bdev::registry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// A node made by `blockdev-add`.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its node name.
    pub name: String,
    /// Its driver.
    pub driver: Driver,
    /// The arguments it was added with.
    pub args: Value,
    /// Nested nodes made with it (name, driver).
    pub children: Vec<(String, Driver)>,
    /// A monitor-owned file node the image reads through (its uring bdev
    /// replaced by the image's own until the image is deleted).
    pub file_ref: Option<String>,
    /// Creation order (for `save_config`).
    pub seq: u64,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Record>,
    next: u64,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// The registry claim the monitor holds on each node it added, so that no
/// other path (a stream releasing intermediate images, `bdev_*_delete`)
/// removes it: QEMU's monitor reference. Not a valid node name.
pub const MONITOR_CLAIM: &str = "monitor (blockdev-add)";

/// Who uses `name`, the monitor's own claim left out.
pub fn user_claims(name: &str) -> Vec<String> {
    let mut v = registry().claims(name);
    v.retain(|c| c != MONITOR_CLAIM);
    v
}

/// Serialises `blockdev-add`, `blockdev-del`, `blockdev-create`, snapshots of
/// plain nodes and `block-export-add`.
static OP: Mutex<()> = Mutex::new(());

/// Held while a node is added or deleted.
pub fn op_lock() -> MutexGuard<'static, ()> {
    OP.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`op_lock`] without blocking (for a task on a reactor): `None` while held.
pub fn try_op_lock() -> Option<MutexGuard<'static, ()>> {
    match OP.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(State::default))
}

/// Records a new node.
pub fn insert(
    name: &str,
    driver: Driver,
    args: Value,
    children: Vec<(String, Driver)>,
    file_ref: Option<String>,
) {
    with(|s| {
        s.next += 1;
        let seq = s.next;
        s.nodes.insert(
            name.to_string(),
            Record {
                name: name.to_string(),
                driver,
                args,
                children,
                file_ref,
                seq,
            },
        );
    })
}

/// Records that the node `name` now reads through `backing` (a
/// `blockdev-snapshot` linked it), so `save_config` re-adds it that way.
pub fn set_backing(name: &str, backing: &str) {
    with(|s| {
        if let Some(r) = s.nodes.get_mut(name) {
            r.args["backing"] = Value::String(backing.to_string());
        }
    })
}

/// Forgets a node.
pub fn forget(name: &str) {
    with(|s| {
        s.nodes.remove(name);
    })
}

/// The record of a node made by `blockdev-add` (a node since deleted by
/// other means, `bdev_*_delete`, has none).
pub fn record(name: &str) -> Option<Record> {
    with(|s| s.nodes.get(name).cloned()).filter(|_| registry().contains(name))
}

/// Every record of a node still registered, oldest first.
pub fn records() -> Vec<Record> {
    let mut v: Vec<Record> = with(|s| s.nodes.values().cloned().collect());
    v.retain(|r| registry().contains(&r.name));
    v.sort_by_key(|r| r.seq);
    v
}

/// The options a node made by `blockdev-add` was given: its own arguments,
/// or for a node nested in one, the parent's `file` member.
pub fn args_of(name: &str) -> Option<Value> {
    with(|s| {
        s.nodes.get(name).map(|r| r.args.clone()).or_else(|| {
            s.nodes
                .values()
                .find(|r| r.children.iter().any(|(c, _)| c == name))
                .and_then(|r| r.args.get("file").filter(|f| f.is_object()).cloned())
        })
    })
}

/// The driver of a node made by `blockdev-add` or nested in one.
pub fn driver_of(name: &str) -> Option<Driver> {
    with(|s| {
        s.nodes.get(name).map(|r| r.driver).or_else(|| {
            s.nodes
                .values()
                .flat_map(|r| r.children.iter())
                .find(|(c, _)| c == name)
                .map(|(_, d)| *d)
        })
    })
}

/// Whether `name` is a node `blockdev-add` made (at the top or nested).
pub fn is_node(name: &str) -> bool {
    driver_of(name).is_some()
}

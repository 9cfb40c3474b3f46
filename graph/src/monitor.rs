//! What the monitor made: the nodes `blockdev-add` added (QEMU's "owned by
//! the monitor"), with their arguments and the nested nodes made with each.
//! The table lives in the [`crate::Graph`]; `blockdev-add` and `blockdev-del`
//! read and change it under the graph's change lock.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// The drivers `blockdev-add` creates nodes of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// A file through io_uring.
    File,
    /// A block device through io_uring.
    HostDevice,
    /// A qcow2 image over a file (or any node).
    Qcow2,
    /// A node that reads and writes its file as it is.
    Raw,
    /// A null device.
    NullCo,
    /// An NBD client (the data on an NBD server).
    Nbd,
    /// A Ceph RBD image.
    Rbd,
    /// QEMU's throttle filter (`bdev::throttle::ThrottleBdev`).
    Throttle,
}

impl Driver {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::File => "file",
            Driver::HostDevice => "host_device",
            Driver::Qcow2 => "qcow2",
            Driver::Raw => "raw",
            Driver::NullCo => "null-co",
            Driver::Nbd => "nbd",
            Driver::Rbd => "rbd",
            Driver::Throttle => "throttle",
        }
    }

    /// A protocol driver that opens a path.
    pub fn is_file(self) -> bool {
        matches!(self, Driver::File | Driver::HostDevice)
    }
}

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

/// The records of the monitor's nodes.
#[derive(Default)]
pub struct MonitorTable {
    nodes: BTreeMap<String, Record>,
    /// Each nested node's parent record: [`MonitorTable::driver_of`] and
    /// [`MonitorTable::args_of`] are asked about every node of
    /// `query-named-block-nodes`, and scanning every record's children for
    /// each would make that quadratic in the number of nodes.
    parent_of: HashMap<String, String>,
    next: u64,
}

impl MonitorTable {
    /// Records a new node.
    pub fn insert(
        &mut self,
        name: &str,
        driver: Driver,
        args: Value,
        children: Vec<(String, Driver)>,
        file_ref: Option<String>,
    ) {
        self.next += 1;
        let seq = self.next;
        self.forget(name);
        for (c, _) in &children {
            self.parent_of
                .entry(c.clone())
                .or_insert_with(|| name.to_string());
        }
        self.nodes.insert(
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
    }

    /// Records that the node `name` now reads through `backing`.
    pub fn set_backing(&mut self, name: &str, backing: &str) {
        if let Some(r) = self.nodes.get_mut(name) {
            r.args["backing"] = Value::String(backing.to_string());
        }
    }

    /// Puts back the `backing` argument a node had (a snapshot undone):
    /// `None` removes it.
    pub fn restore_backing(&mut self, name: &str, backing: Option<Value>) {
        if let Some(r) = self.nodes.get_mut(name) {
            match (backing, r.args.as_object_mut()) {
                (Some(b), _) => r.args["backing"] = b,
                (None, Some(o)) => {
                    o.remove("backing");
                }
                (None, None) => {}
            }
        }
    }

    /// Forgets a node.
    pub fn forget(&mut self, name: &str) {
        if let Some(r) = self.nodes.remove(name) {
            for (c, _) in &r.children {
                if self.parent_of.get(c).is_some_and(|p| p == name) {
                    self.parent_of.remove(c);
                }
            }
        }
    }

    /// The record `name` is nested in.
    fn parent(&self, name: &str) -> Option<&Record> {
        self.parent_of.get(name).and_then(|p| self.nodes.get(p))
    }

    /// The record of a node (registered or not).
    pub fn get(&self, name: &str) -> Option<Record> {
        self.nodes.get(name).cloned()
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Vec<Record> {
        let mut v: Vec<Record> = self.nodes.values().cloned().collect();
        v.sort_by_key(|r| r.seq);
        v
    }

    /// The options a node was given: its own arguments, or for a node nested
    /// in one, the parent's `file` member.
    pub fn args_of(&self, name: &str) -> Option<Value> {
        self.nodes.get(name).map(|r| r.args.clone()).or_else(|| {
            self.parent(name)
                .and_then(|r| r.args.get("file").filter(|f| f.is_object()).cloned())
        })
    }

    /// The driver of a node made by `blockdev-add` or nested in one.
    pub fn driver_of(&self, name: &str) -> Option<Driver> {
        self.nodes.get(name).map(|r| r.driver).or_else(|| {
            self.parent(name)?
                .children
                .iter()
                .find(|(c, _)| c == name)
                .map(|(_, d)| *d)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_nodes_are_found_through_their_parent() {
        let mut m = MonitorTable::default();
        m.insert(
            "img",
            Driver::Qcow2,
            json!({"file": {"driver": "file", "filename": "/x"}}),
            vec![("img.file".into(), Driver::File)],
            None,
        );
        m.insert("n", Driver::NullCo, json!({}), Vec::new(), None);
        assert_eq!(m.driver_of("img"), Some(Driver::Qcow2));
        assert_eq!(m.driver_of("img.file"), Some(Driver::File));
        assert_eq!(
            m.args_of("img.file"),
            Some(json!({"driver": "file", "filename": "/x"}))
        );
        assert_eq!(m.driver_of("other"), None);
        assert_eq!(m.args_of("other"), None);
        // Replaced: the old children go, the new ones come.
        m.insert(
            "img",
            Driver::Qcow2,
            json!({}),
            vec![("img.f2".into(), Driver::HostDevice)],
            None,
        );
        assert_eq!(m.driver_of("img.file"), None);
        assert_eq!(m.driver_of("img.f2"), Some(Driver::HostDevice));
        assert_eq!(m.args_of("img.f2"), None); // no `file` object in the args
        m.forget("img");
        assert_eq!(m.driver_of("img.f2"), None);
        assert_eq!(m.driver_of("n"), Some(Driver::NullCo));
        assert!(m.parent_of.is_empty());
    }
}

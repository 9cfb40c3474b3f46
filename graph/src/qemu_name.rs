//! The name QEMU gives a node (block.c `bdrv_refresh_filename`), which is what
//! an image header's backing file string and format hold once the node
//! becomes that image's backing (a stream's final change, a snapshot's
//! overlay, `change-backing-file`).
//!
//! A node is described as QEMU would see it ([`QemuNode`]): a protocol node
//! over a path (`file`, `host_device`), a format node over a child (`raw`,
//! `qcow2`), or a node known only by its options (`null-co`; sluice-only
//! drivers such as `malloc`). Its filename ([`filename`]) is the plain name
//! when there is one: a protocol node's path, a format node's child's name,
//! `null-co://` for a null node with no options; otherwise a `json:`
//! pseudo-filename of its options, printed as QEMU prints a `QDict` (keys in
//! its hash order, `{"k": v, ...}`), so that the header holds byte for byte
//! what qemu-storage-daemon writes. The format written is the node's driver
//! ([`driver`]): `file` for a file node, `null-co` for a null node.
//!
//! How sluice's bdevs map: a qcow2 image is `qcow2` over its file; a uring
//! leaf is `raw` over a `file` (or `host_device`) node, as QEMU opens a raw
//! backing file, unless the management layer says otherwise; a device (a
//! front door) is its root; a null bdev is `null-co`; a malloc bdev, an error
//! bdev and an NVMe namespace have no QEMU equivalent that could be reopened,
//! and get sluice-only `json:` names (`malloc`, `error`) or QEMU's `nvme://`.
//! A job's filter node (`bdev::filter`) is QEMU's: `copy-on-read` known by
//! its options (`json:{"driver": "copy-on-read", "file": {...}}`),
//! `commit_top` and `mirror_top` by their child's name.
//! The management layer (`blockdev-add` nodes, whose options it knows)
//! answers first through [`register_describer`].

use bdev::device::Device;
use bdev::error_bdev::ErrorBdev;
use bdev::filter::{FilterBdev, FilterKind};
use bdev::malloc::MallocBdev;
use bdev::null::NullBdev;
use bdev::nvme::bdev::NvmeBdev;
use bdev::uring::UringBdev;
use bdev::Bdev;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};

/// A node as QEMU sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum QemuNode {
    /// A protocol node over a path (`file`, `host_device`), or with a plain
    /// protocol filename (`nvme://...`).
    Protocol {
        /// The driver.
        driver: String,
        /// Its filename.
        filename: String,
    },
    /// A format node over one child, with default options (`raw`, `qcow2`).
    Format {
        /// The driver.
        driver: String,
        /// The `file` child.
        file: Box<QemuNode>,
    },
    /// A node known by its options (besides `driver`), as they were given.
    Options {
        /// The driver.
        driver: String,
        /// The options.
        options: Map<String, Value>,
    },
}

/// Describes a node the management layer created (`None`: not one of its
/// own, or not in its graph).
pub type Describer = Arc<dyn Fn(&Arc<dyn Bdev>) -> Option<QemuNode> + Send + Sync>;

static DESCRIBERS: Mutex<Vec<Describer>> = Mutex::new(Vec::new());

/// Adds a service's describer: each answers only for the nodes of its own
/// graph, so services side by side in one process each name their own.
pub fn register_describer(d: Describer) {
    DESCRIBERS.lock().unwrap_or_else(|e| e.into_inner()).push(d);
}

fn registered(b: &Arc<dyn Bdev>) -> Option<QemuNode> {
    let ds = DESCRIBERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ds.iter().find_map(|d| d(b))
}

/// The node `b` as QEMU would see it.
pub fn describe(b: &Arc<dyn Bdev>) -> QemuNode {
    describe_as(b, false)
}

/// `b` as the `file` child of a format node: a uring leaf is then the
/// protocol node itself, not a raw node over it.
pub fn describe_file_child(b: &Arc<dyn Bdev>) -> QemuNode {
    describe_as(b, true)
}

fn describe_as(b: &Arc<dyn Bdev>, as_file: bool) -> QemuNode {
    if let Some(n) = registered(b) {
        return n;
    }
    if let Some(img) = crate::node::image(b) {
        let file = match (img.file_child(), img.filename()) {
            (Some(f), _) => describe_file_child(&f),
            (None, Some(path)) => protocol("file", path),
            (None, None) => options("sluice", [("node-name", Value::from(b.name()))]),
        };
        return QemuNode::Format {
            driver: img.format().to_string(),
            file: Box::new(file),
        };
    }
    let any = b.as_any();
    if let Some(u) = any.downcast_ref::<UringBdev>() {
        let driver = if u.is_block_device() {
            "host_device"
        } else {
            "file"
        };
        let file = protocol(driver, u.path().display().to_string());
        if as_file {
            return file;
        }
        return QemuNode::Format {
            driver: "raw".into(),
            file: Box::new(file),
        };
    }
    if let Some(d) = Device::from_bdev(b) {
        return describe_as(&d.root(), as_file);
    }
    if let Some(f) = FilterBdev::from_bdev(b) {
        let child = f.child().map(|c| describe(&c));
        return match (f.kind(), child) {
            // QEMU names a copy-on-read node by its options; commit_top and
            // mirror_top take their child's name.
            (FilterKind::CopyOnRead, Some(c)) => {
                options(f.kind().driver(), [("file", Value::Object(to_qdict(&c)))])
            }
            (_, Some(c)) => QemuNode::Format {
                driver: f.kind().driver().into(),
                file: Box::new(c),
            },
            (_, None) => options(f.kind().driver(), [("node-name", Value::from(b.name()))]),
        };
    }
    if let Some(n) = any.downcast_ref::<NullBdev>() {
        let mut o = vec![("size", Value::from(b.size()))];
        if n.options().zero_reads {
            o.push(("read-zeroes", Value::Bool(true)));
        }
        return options("null-co", o);
    }
    if any.downcast_ref::<MallocBdev>().is_some() {
        return options("malloc", [("size", Value::from(b.size()))]);
    }
    if let Some(e) = any.downcast_ref::<ErrorBdev>() {
        let image = to_qdict(&describe(e.base()));
        return options("error", [("image", Value::Object(image))]);
    }
    if any.downcast_ref::<NvmeBdev>().is_some() {
        if let Some(f) = b.filename() {
            return protocol("nvme", f);
        }
    }
    if b.driver_specific().get("nbd").is_some() {
        if let Some(f) = b.filename() {
            // An NBD client node (QEMU opens a backing over NBD as raw over nbd).
            let file = protocol("nbd", f);
            if as_file {
                return file;
            }
            return QemuNode::Format {
                driver: "raw".into(),
                file: Box::new(file),
            };
        }
    }
    let driver = b
        .driver_specific()
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .unwrap_or_else(|| "sluice".into());
    options(&driver, [("node-name", Value::from(b.name()))])
}

/// A protocol node.
pub fn protocol(driver: &str, filename: impl Into<String>) -> QemuNode {
    QemuNode::Protocol {
        driver: driver.into(),
        filename: filename.into(),
    }
}

/// A node known by `opts`.
pub fn options<'a>(driver: &str, opts: impl IntoIterator<Item = (&'a str, Value)>) -> QemuNode {
    QemuNode::Options {
        driver: driver.into(),
        options: opts.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

/// The node's driver: the format a header records with its name.
pub fn driver(n: &QemuNode) -> &str {
    match n {
        QemuNode::Protocol { driver, .. }
        | QemuNode::Format { driver, .. }
        | QemuNode::Options { driver, .. } => driver,
    }
}

/// QEMU's `exact_filename`: the plain name, when the node has one.
fn exact_filename(n: &QemuNode) -> Option<String> {
    match n {
        QemuNode::Protocol { filename, .. } => Some(filename.clone()),
        QemuNode::Format { file, .. } => exact_filename(file),
        QemuNode::Options { driver, options } if driver == "null-co" && options.is_empty() => {
            Some("null-co://".into())
        }
        QemuNode::Options { .. } => None,
    }
}

/// The node's filename as QEMU gives it: plain, or `json:{...}`.
pub fn filename(n: &QemuNode) -> String {
    exact_filename(n).unwrap_or_else(|| format!("json:{}", qdict_json(&Value::Object(to_qdict(n)))))
}

/// The node's options as a dictionary (QEMU's `full_open_options`).
fn to_qdict(n: &QemuNode) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("driver".into(), Value::from(driver(n)));
    match n {
        QemuNode::Protocol { filename, .. } => {
            m.insert("filename".into(), Value::from(filename.as_str()));
        }
        QemuNode::Format { file, .. } => {
            m.insert("file".into(), Value::Object(to_qdict(file)));
        }
        QemuNode::Options { options, .. } => {
            for (k, v) in options {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    m
}

/// QEMU's `QDict` bucket of a key (`tdb_hash` modulo 512): the order in which
/// it iterates, and so prints, a dictionary's members.
fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        v = v.wrapping_add((c as u32) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// JSON as QEMU's `qobject_to_json` prints it: `{"k": v, ...}` in `QDict`
/// order, `[a, b]`, strings with only printable ASCII left unescaped.
fn qdict_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(v, &mut out);
    out
}

fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| qdict_bucket(k));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(k, out);
                out.push_str(": ");
                write_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(x, out);
            }
            out.push(']');
        }
        Value::String(s) => write_str(s, out),
        other => out.push_str(&other.to_string()),
    }
}

/// `s` as a JSON string the way QEMU's `qobject_to_json` writes one:
/// printable ASCII as is, every other character as `\uXXXX` UTF-16 units.
/// (The QMP writer in `rpc` quotes with it too.)
pub fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_qemu() {
        let null = options(
            "null-co",
            [
                ("size", Value::from(1048576u64)),
                ("read-zeroes", Value::Bool(true)),
            ],
        );
        // What qemu-storage-daemon 10.0 shows and writes for these nodes.
        assert_eq!(
            filename(&null),
            r#"json:{"read-zeroes": true, "driver": "null-co", "size": 1048576}"#
        );
        assert_eq!(filename(&options("null-co", [])), "null-co://");
        let raw = QemuNode::Format {
            driver: "raw".into(),
            file: Box::new(protocol("file", "/tmp/b.raw")),
        };
        assert_eq!(filename(&raw), "/tmp/b.raw");
        assert_eq!(driver(&raw), "raw");
        let raw_null = QemuNode::Format {
            driver: "raw".into(),
            file: Box::new(options("null-co", [("size", Value::from(512u64))])),
        };
        assert_eq!(
            filename(&raw_null),
            r#"json:{"driver": "raw", "file": {"driver": "null-co", "size": 512}}"#
        );
        assert_eq!(
            qdict_json(&Value::from("a\"b\\c\u{e9}\u{1F600}")),
            r#""a\"b\\c\u00E9\uD83D\uDE00""#
        );
    }
}

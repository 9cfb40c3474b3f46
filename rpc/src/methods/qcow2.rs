//! qcow2 images as devices: `bdev_qcow2_create`, `bdev_qcow2_open`,
//! `bdev_qcow2_delete`, and QEMU's `query-block` / `query-named-block-nodes`.
//!
//! An image is a *node* (named like QEMU's node-names); opening it with a
//! `name` also makes a *device* of that name over it, which clients, exports
//! and jobs address and which snapshots move onto new overlays. The backing
//! chain read from the header is registered as nodes `<node>.backing`,
//! `<node>.backing.backing`, ... each claimed by the node above it.

use crate::error::RpcError;
use crate::methods::blockdev::state::{annotate, is_raw_node};
use crate::methods::common::{delete_bdev, qemu_io_limits};
use crate::methods::nodes::{check_names, delete_node, locking_param, open, Open};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::device::Device;
use bdev::filter::FilterBdev;
use bdev::lock::LockMode;
use bdev::qcow2::{self, CreateOptions};
use bdev::Bdev;
use graph::node;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("bdev_qcow2_create", bdev_qcow2_create);
    t.add("bdev_qcow2_open", |svc, p| {
        let o = p.parse()?;
        let _g = svc.graph.change();
        open(svc, o)
    });
    t.add("bdev_qcow2_delete", bdev_qcow2_delete);
    t.add("query-block", |svc, p| {
        p.none()?;
        Ok(query_block(svc))
    });
    t.add("query-named-block-nodes", |svc, p| {
        let a: NamedNodes = p.parse_qapi()?;
        Ok(query_named_block_nodes(svc, a.flat.unwrap_or(false)))
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: Option<String>,
    node_name: Option<String>,
    filename: Option<String>,
    base_bdev: Option<String>,
    direct: Option<bool>,
    reactor: Option<usize>,
    /// Image locks, as `bdev_qcow2_open`'s.
    locking: Option<String>,
    /// Virtual size in bytes.
    size: u64,
    cluster_size: Option<u64>,
    /// 2 or 3 (default 3).
    version: Option<u32>,
    backing_file: Option<String>,
    backing_format: Option<String>,
}

/// Checks what `open` will check of a new image's names, and the backing
/// file the image will name: all before any file is written. Returns the
/// image's `locking`.
fn check_create(svc: &Service, c: &Create) -> Result<LockMode, RpcError> {
    let node_name = check_names(svc, &c.name, &c.node_name, None)?;
    if c.name.as_deref() == Some(node_name.as_str()) {
        return Err(RpcError::invalid_params(format!(
            "'name' and 'node_name' are both {node_name:?}"
        )));
    }
    if let Some(f) = &c.backing_format {
        if !["qcow2", "raw"].contains(&f.as_str()) {
            return Err(RpcError::invalid_params(format!(
                "backing_format: {f:?} is neither \"qcow2\" nor \"raw\""
            )));
        }
    }
    if let Some(b) = &c.backing_file {
        if b.is_empty() {
            return Err(RpcError::invalid_params("backing_file: must not be empty"));
        }
        let image = c.filename.as_deref().map(std::path::Path::new);
        let path = qcow2::resolve_backing_path(b, image)?;
        if let Err(e) = std::fs::metadata(&path) {
            return Err(RpcError::errno(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("Could not open backing file '{}': {e}", path.display()),
            ));
        }
    }
    locking_param(c.locking.as_deref())
}

fn bdev_qcow2_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let c: Create = p.parse()?;
    let _g = svc.graph.change();
    let locking = check_create(svc, &c)?;
    let opts = CreateOptions {
        cluster_size: c.cluster_size.unwrap_or(65536),
        version: c.version.unwrap_or(3),
        backing_file: c.backing_file.clone(),
        backing_format: c.backing_format.clone(),
        ..CreateOptions::new(c.size)
    };
    let target: Result<Arc<dyn Bdev>, PathBuf> = match (&c.filename, &c.base_bdev) {
        (Some(f), None) => Err(PathBuf::from(f)),
        (None, Some(b)) => Ok(svc.graph.nodes().get(b)?),
        _ => {
            return Err(RpcError::invalid_params(
                "exactly one of 'filename' and 'base_bdev' is required",
            ))
        }
    };
    let reactor = c.reactor.unwrap_or(0);
    svc.rt
        .spawn_on(reactor, move || async move {
            match target {
                Ok(b) => qcow2::create(b, &opts).await,
                Err(path) => qcow2::create_file_locking(&path, &opts, locking).await,
            }
        })
        .block()??;
    // The new image's backing file (if any) is opened from its header.
    open(
        svc,
        Open {
            name: c.name,
            node_name: c.node_name,
            filename: c.filename,
            base_bdev: c.base_bdev,
            backing: None,
            no_backing: false,
            read_only: false,
            direct: c.direct,
            reactor: c.reactor,
            locking: c.locking,
            file_node: None,
            ..Open::default()
        },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
}

fn bdev_qcow2_delete(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let d: Delete = p.parse()?;
    let _g = svc.graph.change();
    let b = svc.graph.nodes().get(&d.name)?;
    if let Some(dev) = Device::from_bdev(&b) {
        if let Some(j) = svc.jobs.job_on_node(dev.root().name()) {
            return Err(RpcError::errno(
                libc::EBUSY,
                format!("device {:?} is in use by job {:?}", d.name, j.id()),
            ));
        }
        let root = dev.root();
        delete_bdev(svc, &d.name)?;
        if svc.graph.nodes().claims(root.name()).is_empty() {
            delete_node(svc, root)?;
        }
    } else {
        if !svc.graph.nodes().claims(&d.name).is_empty() {
            return Err(RpcError::errno(
                libc::EBUSY,
                format!(
                    "bdev {:?} is in use by {}",
                    d.name,
                    svc.graph.nodes().claims(&d.name).join(", ")
                ),
            ));
        }
        delete_node(svc, b)?;
    }
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedNodes {
    flat: Option<bool>,
}

/// QEMU's `actual-size`: the bytes the node's file takes on disk (0 for
/// nodes without a file).
fn actual_size(b: &Arc<dyn Bdev>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    b.filename()
        .or_else(|| node::image(b).and_then(|i| i.filename()))
        .and_then(|f| std::fs::metadata(f).ok())
        .filter(|m| m.is_file())
        .map_or(0, |m| m.blocks() * 512)
}

/// QEMU's `format-specific` of an image: `ImageInfoSpecificQCow2` for a
/// qcow2 image, the empty `file` kind for a regular file.
fn format_specific(b: &Arc<dyn Bdev>) -> Option<Value> {
    if let Some(q) = b.as_any().downcast_ref::<qcow2::Qcow2Bdev>() {
        let f = q.features();
        let mut data = json!({
            "compat": if f.version >= 3 { "1.1" } else { "0.10" },
            "compression-type": if f.zstd { "zstd" } else { "zlib" },
            "refcount-bits": f.refcount_bits,
        });
        if f.version >= 3 {
            data["lazy-refcounts"] = json!(f.lazy_refcounts);
            data["corrupt"] = json!(f.corrupt);
            data["extended-l2"] = json!(f.extended_l2);
        }
        return Some(json!({"type": "qcow2", "data": data}));
    }
    let file = b
        .as_any()
        .downcast_ref::<bdev::uring::UringBdev>()
        .is_some_and(|u| !u.is_block_device());
    file.then(|| json!({"type": "file", "data": {}}))
}

/// QAPI `ImageInfo` of a node and the chain below it.
fn image_info(b: &Arc<dyn Bdev>, depth: usize) -> Value {
    let format = node::format_of(b);
    let mut v = json!({
        "filename": node::filename_of(b),
        "format": format,
        "virtual-size": b.size(),
    });
    // QEMU's protocol drivers without an allocated size (nbd) leave it out.
    if format != "nbd" {
        v["actual-size"] = json!(actual_size(b));
    }
    // QEMU's drivers without `bdrv_get_info` (null-co) have no dirty flag.
    if !b.as_any().is::<bdev::null::NullBdev>() {
        v["dirty-flag"] = json!(false);
    }
    if let Some(fs) = format_specific(b) {
        v["format-specific"] = fs;
    }
    if let Some(img) = node::image(b) {
        v["cluster-size"] = json!(img.cluster_size());
        if let Some(f) = img.backing_file() {
            v["backing-filename"] = json!(f);
        }
        if let Some(back) = img.backing() {
            v["full-backing-filename"] = json!(node::filename_of(&back));
            v["backing-filename-format"] = json!(node::format_of(&back));
            if depth < 64 {
                v["backing-image"] = image_info(&back, depth + 1);
            }
        }
    }
    v
}

/// QAPI `BlockDeviceInfo` of a job's filter node (QEMU's `copy-on-read`,
/// `commit_top`, `mirror_top`): its own `image` of the filter's format over
/// its child's, and the child's chain in its depth.
fn filter_info(b: &Arc<dyn Bdev>, child: Option<Arc<dyn Bdev>>) -> Value {
    let format = node::format_of(b);
    let file = node::filename_of(b);
    let mut image = json!({
        "filename": file,
        "format": format,
        "virtual-size": b.size(),
        "dirty-flag": false,
    });
    let mut depth = 0;
    if let Some(c) = &child {
        image["actual-size"] = json!(actual_size(c));
        if let Some(img) = node::image(c) {
            image["cluster-size"] = json!(img.cluster_size());
        }
        image["backing-image"] = image_info(c, 1);
        depth = node::chain(c).len();
    }
    json!({
        "node-name": b.name(),
        "active": true,
        "file": file,
        "ro": b.read_only(),
        "drv": format,
        "backing_file_depth": depth,
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": false, "no-flush": false},
        "image": image,
    })
}

/// QAPI `BlockDeviceInfo` of a node.
fn node_info(b: &Arc<dyn Bdev>) -> Value {
    if let Some(f) = FilterBdev::from_bdev(b) {
        return filter_info(b, f.child());
    }
    let depth = node::chain(b).len() - 1;
    let mut v = json!({
        "node-name": b.name(),
        "active": true,
        "file": node::filename_of(b),
        // A node whose image lock was lowered to a reader's (an old top
        // under a snapshot) is read-only as QEMU's reopened old top is.
        "ro": b.read_only() || b.lock_perms().is_some_and(|p| p.perm & bdev::lock::PERM_WRITE == 0),
        "drv": node::format_of(b),
        "backing_file_depth": depth,
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": false, "no-flush": false},
        "image": image_info(b, 0),
    });
    if let Some(f) = node::image(b).and_then(|i| i.backing_file()) {
        v["backing_file"] = json!(f);
    }
    v
}

/// `query-block`: every device with its chain.
fn query_block(svc: &Service) -> Value {
    let v: Vec<Value> = svc
        .graph
        .nodes()
        .list()
        .iter()
        .filter(|b| !is_raw_node(svc, b.name()))
        .filter_map(|b| Device::from_bdev(b).map(|d| (b.name().to_string(), d.root())))
        .map(|(name, root)| {
            let mut inserted = node_info(&root);
            qemu_io_limits(svc, &name, &mut inserted);
            json!({
                "device": name,
                "qdev": "",
                "locked": false,
                "removable": false,
                "type": "unknown",
                "io-status": "ok",
                "inserted": inserted,
            })
        })
        .collect();
    Value::Array(v)
}

/// `query-named-block-nodes`: every node (image or leaf) that is not a
/// device; `flat`: without the `backing-image` chain in `image`.
fn query_named_block_nodes(svc: &Service, flat: bool) -> Value {
    Value::Array(
        svc.graph
            .nodes()
            .list()
            .iter()
            .filter(|b| Device::from_bdev(b).is_none() || is_raw_node(svc, b.name()))
            .map(|b| {
                let mut v = node_info(b);
                annotate(svc, b, &mut v);
                if flat {
                    // QEMU counts the depth while it nests the chain.
                    v["backing_file_depth"] = json!(0);
                    if let Some(i) = v["image"].as_object_mut() {
                        i.remove("backing-image");
                    }
                }
                v
            })
            .collect(),
    )
}

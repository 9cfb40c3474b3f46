//! qcow2 images as devices: `bdev_qcow2_create`, `bdev_qcow2_open`,
//! `bdev_qcow2_delete`, and QEMU's `query-block` / `query-named-block-nodes`.
//!
//! An image is a *node* (named like QEMU's node-names); opening it with a
//! `name` also makes a *device* of that name over it, which clients, exports
//! and jobs address and which snapshots move onto new overlays. The backing
//! chain read from the header is registered as nodes `<node>.backing`,
//! `<node>.backing.backing`, ... each claimed by the node above it.

use super::bdev::{delete_bdev, locking_param};
use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::device::Device;
use bdev::lock::LockMode;
use bdev::qcow2::{self, BackingSpec, CreateOptions, OpenOptions, OverlapChecks, Qcow2Bdev};
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
        p.none()?;
        Ok(query_named_block_nodes(svc))
    });
}

/// `overlap_check` as a mode name (see [`OverlapChecks::from_mode`]).
fn overlap_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<OverlapChecks>, D::Error> {
    let m: Option<String> = Option::deserialize(d)?;
    m.map(|m| OverlapChecks::from_mode(&m).map_err(serde::de::Error::custom))
        .transpose()
}

/// `bdev_qcow2_open`'s parameters (also what `blockdev-add` maps onto).
#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Open {
    /// Device name (none: only a node).
    pub name: Option<String>,
    /// Node name (default: `<name>-node`).
    pub node_name: Option<String>,
    /// Image file.
    pub filename: Option<String>,
    /// Or: the registered bdev holding the image.
    pub base_bdev: Option<String>,
    /// Backing: a registered node name to read through; default: the header's file.
    pub backing: Option<String>,
    /// Ignore the header's backing file.
    #[serde(default)]
    pub no_backing: bool,
    #[serde(default)]
    pub read_only: bool,
    /// O_DIRECT for files (default true).
    pub direct: Option<bool>,
    /// The reactor owning the image's metadata (default 0).
    pub reactor: Option<usize>,
    /// Metadata overlap checks before writes: `none`, `constant`, `cached`
    /// (default) or `all` (QEMU's `overlap-check`; `blockdev-add` gives its
    /// parsed form).
    #[serde(default, deserialize_with = "overlap_mode")]
    pub overlap_check: Option<OverlapChecks>,
    /// Image locks on the image's file and its backing files: QEMU's
    /// `locking` (`auto`, the default, is on).
    pub locking: Option<String>,
    /// Not a parameter (`blockdev-add`): with `filename`, the uring bdev under
    /// the image gets this name and is registered too, claimed by the image.
    #[serde(skip)]
    pub file_node: Option<String>,
    /// Not a parameter (`blockdev-add`): `force-share` of a read-only image
    /// (its file and backing files share everything).
    #[serde(skip)]
    pub force_share: bool,
    /// Not a parameter (`blockdev-add`): `force-share` of the image's nested
    /// file node only (the image file shares everything, backing files not).
    #[serde(skip)]
    pub file_force_share: bool,
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

fn node_name_of(name: &Option<String>, node_name: &Option<String>) -> Result<String, RpcError> {
    match (name, node_name) {
        (_, Some(n)) => Ok(n.clone()),
        (Some(d), None) => Ok(format!("{d}-node")),
        (None, None) => Err(RpcError::invalid_params(
            "one of 'name' and 'node_name' is required",
        )),
    }
}

/// The node name of an image to open (see [`node_name_of`]), once neither
/// it, the device `name` nor the `file_node` is taken.
fn check_names(
    svc: &Service,
    name: &Option<String>,
    node_name: &Option<String>,
    file_node: Option<&String>,
) -> Result<String, RpcError> {
    let node_name = node_name_of(name, node_name)?;
    if let Some(d) = name {
        if svc.graph.nodes().contains(d) {
            return Err(RpcError::errno(
                libc::EEXIST,
                format!("a bdev named {d:?} already exists"),
            ));
        }
    }
    for n in std::iter::once(&node_name).chain(file_node) {
        if svc.graph.nodes().contains(n) {
            return Err(RpcError::errno(
                libc::EEXIST,
                format!("Duplicate nodes with node-name='{n}'"),
            ));
        }
    }
    Ok(node_name)
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

/// Registers the chain below `top` that is not registered yet, each node
/// claimed by the one above it.
fn register_chain(
    svc: &Service,
    top: &Arc<dyn Bdev>,
    added: &mut Vec<String>,
) -> Result<(), RpcError> {
    let chain = node::chain(top);
    for w in chain.windows(2) {
        let (above, b) = (&w[0], &w[1]);
        if !svc.graph.nodes().contains(b.name()) {
            svc.graph.register(b.clone())?;
            added.push(b.name().to_string());
            svc.graph.nodes().claim(
                b.name(),
                bdev::Claim::backing(bdev::Holder::Node(above.name().to_string())),
            )?;
        }
    }
    Ok(())
}

/// Opens an image as a node (and a device when `name` is given); returns the
/// device's or the node's name.
pub(crate) fn open(svc: &Service, o: Open) -> Result<Value, RpcError> {
    let node_name = check_names(svc, &o.name, &o.node_name, o.file_node.as_ref())?;
    let backing = match (&o.backing, o.no_backing) {
        (Some(_), true) => {
            return Err(RpcError::invalid_params(
                "'backing' and 'no_backing' exclude each other",
            ))
        }
        (Some(n), false) => BackingSpec::Named(n.clone()),
        (None, true) => BackingSpec::None,
        (None, false) => BackingSpec::FromHeader,
    };
    let overlap_check = o.overlap_check.unwrap_or_default();
    let opts = OpenOptions {
        read_only: o.read_only,
        backing,
        nodes: Some(svc.graph.nodes().clone()),
        direct: o.direct.unwrap_or(true),
        overlap_check,
        locking: locking_param(o.locking.as_deref())?,
        force_share: o.force_share,
        file_force_share: o.file_force_share,
        ..OpenOptions::default()
    };
    let base: Result<Arc<dyn Bdev>, PathBuf> = match (&o.filename, &o.base_bdev) {
        (Some(f), None) => Err(PathBuf::from(f)),
        (None, Some(b)) => Ok(svc.graph.nodes().get(b)?),
        _ => {
            return Err(RpcError::invalid_params(
                "exactly one of 'filename' and 'base_bdev' is required",
            ))
        }
    };
    let base_name = o.base_bdev.clone();
    let nn = node_name.clone();
    let file_node = o.file_node.clone();
    let img: Arc<Qcow2Bdev> = svc
        .rt
        .spawn_on(o.reactor.unwrap_or(0), move || async move {
            match (base, file_node) {
                (Ok(b), _) => Qcow2Bdev::open(&nn, b, opts).await,
                (Err(path), None) => qcow2::open_file(&nn, &path, opts).await,
                (Err(path), Some(f)) => qcow2::open_file_as(&nn, &f, &path, opts).await,
            }
        })
        .block()??;
    let file_bdev = img.base().clone();
    let img: Arc<dyn Bdev> = img;
    // Everything or nothing: on a failure what was registered is deleted
    // again (the image last, ending its lock).
    let mut added: Vec<String> = Vec::new();
    let r = register_opened(
        svc,
        &o,
        &node_name,
        &img,
        file_bdev,
        base_name.as_deref(),
        &mut added,
    );
    if r.is_err() {
        let me = bdev::Holder::Node(node_name.clone());
        // The file is left as it was found: trimmed back to the image's end.
        if let Err(e) = close_image(svc, &img) {
            tracing::error!(node = %node_name, "closing an image whose open failed: {e}");
        }
        // Top down: the image, its chain, then the file node under it.
        if o.file_node.is_some() && base_name.is_none() && !added.is_empty() {
            let f = added.remove(0);
            added.push(f);
        }
        for n in &added {
            svc.graph.release_all(&bdev::Holder::Node(n.clone()));
            if let Err(e) = svc.graph.delete(n) {
                tracing::error!(node = %n, "rolling back a failed open: {e}");
            }
        }
        svc.graph.release_all(&me);
        img.on_delete();
    }
    r
}

/// Registers what [`open`] opened; the names registered go to `added`.
fn register_opened(
    svc: &Service,
    o: &Open,
    node_name: &str,
    img: &Arc<dyn Bdev>,
    file_bdev: Arc<dyn Bdev>,
    base_name: Option<&str>,
    added: &mut Vec<String>,
) -> Result<Value, RpcError> {
    let me = bdev::Holder::Node(node_name.to_string());
    if let Some(b) = base_name {
        svc.graph
            .nodes()
            .claim(b, bdev::Claim::file(me.clone(), !img.read_only()))?;
    }
    if let (Some(f), None) = (&o.file_node, base_name) {
        svc.graph
            .register_claimed(file_bdev, bdev::Claim::file(me.clone(), !img.read_only()))?;
        added.push(f.clone());
    }
    svc.graph.register(img.clone())?;
    added.push(node_name.to_string());
    if let Err(e) = register_chain(svc, img, added) {
        tracing::warn!(node = %node_name, "registering the backing chain: {e}");
    }
    match &o.name {
        Some(d) => {
            let dev: Arc<dyn Bdev> = Device::new(svc.graph.nodes(), d, img.clone())?;
            if let Err(e) = svc.graph.register(dev.clone()) {
                dev.on_delete();
                drop(dev);
                svc.graph
                    .nodes()
                    .release(node_name, &bdev::Holder::Device(d.clone()));
                return Err(e.into());
            }
            Ok(json!(d))
        }
        None => Ok(json!(node_name)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
}

/// Flushes an image node and trims the file its open extended (on its
/// owner reactor); nothing for other nodes.
fn close_image(svc: &Service, b: &Arc<dyn Bdev>) -> Result<(), RpcError> {
    let Some(img) = node::image(b) else {
        return Ok(());
    };
    let b2 = b.clone();
    svc.rt
        .spawn_on(img.owner(), move || async move {
            match b2.as_any().downcast_ref::<Qcow2Bdev>() {
                Some(q) => q.close().await,
                None => Ok(()),
            }
        })
        .block()??;
    Ok(())
}

/// Flushes and trims an image node, then deletes it and whatever below it
/// nothing else uses any more (a node made by `blockdev-add` stays: the
/// monitor owns it).
pub(crate) fn delete_node(svc: &Service, b: Arc<dyn Bdev>) -> Result<(), RpcError> {
    let chain = node::chain(&b);
    close_image(svc, &b)?;
    let mut above: Option<String> = None;
    for n in chain {
        let name = n.name().to_string();
        if let Some(a) = &above {
            svc.graph
                .nodes()
                .release(&name, &bdev::Holder::Node(a.clone()));
        }
        if !svc.graph.nodes().contains(&name) || !svc.graph.nodes().claims(&name).is_empty() {
            break;
        }
        if above.is_some() && super::blockdev::monitor_owned(svc, &name) {
            break;
        }
        delete_bdev(svc, &name)?;
        // The node's claims on bdevs outside its chain (the `base_bdev` it
        // was opened on, a snapshot target) end with it.
        svc.graph.release_all(&bdev::Holder::Node(name.clone()));
        above = Some(name);
    }
    Ok(())
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

/// QAPI `ImageInfo` of a node and the chain below it.
fn image_info(b: &Arc<dyn Bdev>, depth: usize) -> Value {
    let mut v = json!({
        "filename": node::filename_of(b),
        "format": node::format_of(b),
        "virtual-size": b.size(),
        "dirty-flag": false,
    });
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

/// QAPI `BlockDeviceInfo` of a node.
fn node_info(b: &Arc<dyn Bdev>) -> Value {
    let depth = node::chain(b).len() - 1;
    let mut v = json!({
        "node-name": b.name(),
        "file": node::filename_of(b),
        "ro": b.read_only(),
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
        .filter(|b| !super::blockdev::is_raw_node(svc, b.name()))
        .filter_map(|b| Device::from_bdev(b).map(|d| (b.name().to_string(), d.root())))
        .map(|(name, root)| {
            json!({
                "device": name,
                "qdev": "",
                "locked": false,
                "removable": false,
                "type": "unknown",
                "io-status": "ok",
                "inserted": node_info(&root),
            })
        })
        .collect();
    Value::Array(v)
}

/// `query-named-block-nodes`: every node (image or leaf) that is not a device.
fn query_named_block_nodes(svc: &Service) -> Value {
    Value::Array(
        svc.graph
            .nodes()
            .list()
            .iter()
            .filter(|b| {
                Device::from_bdev(b).is_none() || super::blockdev::is_raw_node(svc, b.name())
            })
            .map(|b| {
                let mut v = node_info(b);
                super::blockdev::annotate(svc, b, &mut v);
                v
            })
            .collect(),
    )
}

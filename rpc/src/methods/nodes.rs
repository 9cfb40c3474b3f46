//! Opening and deleting image and file nodes, shared by the `bdev_*` methods
//! (`bdev_qcow2_open`, `bdev_qcow2_delete`, `bdev_uring_create`) and QEMU's
//! `blockdev-add` / `blockdev-del`, which open and delete through the same
//! code: an image node (and a device over it) with its backing chain
//! registered below it, a file as a uring bdev, and the `locking` parameter.

use crate::error::RpcError;
use crate::methods::blockdev::state::monitor_owned;
use crate::methods::common::delete_bdev;
use crate::service::Service;
use bdev::device::Device;
use bdev::lock::LockMode;
use bdev::qcow2::{self, BackingSpec, OpenOptions, OverlapChecks, Qcow2Bdev};
use bdev::uring::{UringBdev, UringOptions};
use bdev::{Bdev, BdevError};
use graph::node;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Not a parameter (`blockdev-add`): QEMU's qcow2 cache options.
    #[serde(skip)]
    pub cache: bdev::qcow2::CacheOptions,
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
pub(crate) fn check_names(
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
        cache: o.cache,
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
        if above.is_some() && monitor_owned(svc, &name) {
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

/// Opens a file as a uring bdev. `direct: None` tries O_DIRECT and falls back
/// to buffered I/O where the filesystem refuses it (as SPDK's aio bdev does).
pub(crate) struct FileOpts {
    pub block_size: Option<u32>,
    pub direct: Option<bool>,
    pub read_only: bool,
    pub uuid: Option<String>,
    /// Image locks (on by default: an exclusive writer; see `bdev::lock`).
    pub locking: LockMode,
    /// `blockdev-add`'s `force-share` of a read-only node: the lock shares
    /// everything ([`bdev::lock::Perms::SHARER`]).
    pub force_share: bool,
}

pub(crate) fn open_file(
    name: &str,
    filename: &str,
    o: FileOpts,
) -> Result<Arc<UringBdev>, RpcError> {
    // SPDK: block_size 0 means "detect".
    let block_size = o.block_size.filter(|b| *b != 0);
    let opts = |direct| UringOptions {
        direct,
        read_only: o.read_only,
        block_size,
        locking: o.locking,
    };
    let perms = bdev::lock::Perms::for_open_sharing(o.read_only, o.force_share);
    let open = |direct| {
        UringBdev::open_with_perms(
            name,
            Path::new(filename),
            opts(direct),
            o.uuid.clone(),
            false,
            perms,
        )
    };
    match o.direct {
        Some(d) => Ok(open(d)?),
        None => match open(true) {
            Err(BdevError::Os { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    bdev = name,
                    file = filename,
                    "O_DIRECT refused; using buffered I/O"
                );
                Ok(open(false)?)
            }
            r => Ok(r?),
        },
    }
}

/// A `locking` parameter: QEMU's `auto`, `on` or `off`.
pub(crate) fn locking_param(v: Option<&str>) -> Result<LockMode, RpcError> {
    match v {
        None => Ok(LockMode::Auto),
        Some(s) => LockMode::parse(s).ok_or_else(|| {
            RpcError::invalid_params(format!(
                "locking: {s:?} is none of \"auto\", \"on\", \"off\""
            ))
        }),
    }
}

/// Opens an RBD node (over a named cluster's connection, or one of its
/// own). Connecting blocks on the cluster: this runs on the caller's
/// (connection) thread, never on a reactor. QEMU's messages
/// (`error connecting: ...`, `error reading header from IMAGE: ...`).
pub fn open_rbd(
    name: &str,
    how: rbd::RbdOpen,
    cluster: Option<Arc<rbd::Cluster>>,
) -> Result<Arc<dyn Bdev>, RpcError> {
    let b = rbd::RbdBdev::open(name, how, cluster).map_err(|e| match e {
        rbd::RbdError::Ceph { what, errno } => RpcError::errno(
            errno,
            format!("{what}: {}", nix::errno::Errno::from_raw(errno).desc()),
        ),
        e => e.into(),
    })?;
    Ok(b)
}

/// Opens an NBD client node (not registered) on reactor 0. A read-only
/// export needs `read-only` or `auto-read-only` (QEMU's error otherwise).
pub fn open_nbd(
    svc: &Service,
    name: &str,
    mut config: nbd::client::ClientConfig,
    read_only: bool,
    auto_read_only: bool,
) -> Result<Arc<dyn Bdev>, RpcError> {
    if let Some(id) = &config.tls_creds {
        let c = svc
            .objects
            .tls_creds(id)
            .map_err(RpcError::invalid_params)?;
        if c.endpoint != nbd::tls::Endpoint::Client {
            return Err(RpcError::invalid_params(
                c.wrong_endpoint(nbd::tls::Endpoint::Client),
            ));
        }
        config.tls = Some(nbd::client::config::ClientTls(c));
    }
    let ro = read_only;
    let n = name.to_string();
    let b = svc
        .rt
        .spawn_on(0, move || async move {
            nbd::client::NbdBdev::open(&n, config, ro).await
        })
        .block()
        .map_err(|e| RpcError::internal(e.to_string()))?
        .map_err(|e| match e {
            // QEMU's words: the OS error's text without Rust's "(os error N)".
            BdevError::Os { what, source } => match source.raw_os_error() {
                Some(n) => RpcError::errno(
                    n,
                    format!("{what}: {}", nix::errno::Errno::from_raw(n).desc()),
                ),
                None => RpcError::errno(libc::EIO, format!("{what}: {source}")),
            },
            e => e.into(),
        })?;
    if b.export_info().has(nbd::proto::tflags::READ_ONLY) && !ro && !auto_read_only {
        return Err(RpcError::errno(libc::EACCES, "NBD export is read-only"));
    }
    Ok(b)
}

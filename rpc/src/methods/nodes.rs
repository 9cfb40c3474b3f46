//! Opening and deleting image and file nodes, shared by the `bdev_*` methods
//! (`bdev_qcow2_open`, `bdev_qcow2_delete`, `bdev_uring_create`) and QEMU's
//! `blockdev-add` / `blockdev-del`, which open and delete through the same
//! code: an image node (and a device over it) with its backing chain
//! registered below it, a file as a uring bdev, and the `locking` parameter.

use crate::error::RpcError;
use crate::methods::blockdev::state::monitor_owned;
use crate::methods::common::{delete_bdev, register_bdev};
use crate::service::Service;
use bdev::device::Device;
use bdev::lock::LockMode;
use bdev::qcow2::{self, BackingSpec, OpenOptions, OverlapChecks, Qcow2Bdev};
use bdev::uring::{UringBdev, UringOptions};
use bdev::{registry, Bdev, BdevError};
use graph::node;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// (default) or `all` (QEMU's `overlap-check`).
    pub overlap_check: Option<String>,
    /// Not a parameter (`blockdev-add`): its parsed `overlap-check`, which
    /// wins over `overlap_check`.
    #[serde(skip)]
    pub overlap_checks: Option<OverlapChecks>,
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
    name: &Option<String>,
    node_name: &Option<String>,
    file_node: Option<&String>,
) -> Result<String, RpcError> {
    let node_name = node_name_of(name, node_name)?;
    if let Some(d) = name {
        if registry().contains(d) {
            return Err(RpcError::errno(
                libc::EEXIST,
                format!("a bdev named {d:?} already exists"),
            ));
        }
    }
    for n in std::iter::once(&node_name).chain(file_node) {
        if registry().contains(n) {
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
fn register_chain(svc: &Service, top: &Arc<dyn Bdev>) -> Result<(), RpcError> {
    let chain = node::chain(top);
    for w in chain.windows(2) {
        let (above, b) = (&w[0], &w[1]);
        if !registry().contains(b.name()) {
            register_bdev(svc, b.clone())?;
            registry().claim(b.name(), above.name())?;
        }
    }
    Ok(())
}

/// Opens an image as a node (and a device when `name` is given); returns the
/// device's or the node's name.
pub(crate) fn open(svc: &Service, o: Open) -> Result<Value, RpcError> {
    let node_name = check_names(&o.name, &o.node_name, o.file_node.as_ref())?;
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
    let overlap_check = match (o.overlap_checks, &o.overlap_check) {
        (Some(c), _) => c,
        (None, Some(m)) => OverlapChecks::from_mode(m).map_err(RpcError::invalid_params)?,
        (None, None) => OverlapChecks::default(),
    };
    let opts = OpenOptions {
        read_only: o.read_only,
        backing,
        direct: o.direct.unwrap_or(true),
        overlap_check,
        locking: locking_param(o.locking.as_deref())?,
        force_share: o.force_share,
        file_force_share: o.file_force_share,
        ..OpenOptions::default()
    };
    let base: Result<Arc<dyn Bdev>, PathBuf> = match (&o.filename, &o.base_bdev) {
        (Some(f), None) => Err(PathBuf::from(f)),
        (None, Some(b)) => Ok(registry().get(b)?),
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
    register_bdev(svc, img.clone())?;
    if let Some(b) = &base_name {
        registry().claim(b, &node_name)?;
    }
    if let (Some(f), None) = (&o.file_node, &base_name) {
        register_bdev(svc, file_bdev)?;
        registry().claim(f, &node_name)?;
    }
    if let Err(e) = register_chain(svc, &img) {
        tracing::warn!(node = %node_name, "registering the backing chain: {e}");
    }
    match &o.name {
        Some(d) => {
            let dev: Arc<dyn Bdev> = Device::new(d, img.clone())?;
            register_bdev(svc, dev)?;
            Ok(json!(d))
        }
        None => Ok(json!(node_name)),
    }
}

/// Flushes and trims an image node, then deletes it and whatever below it
/// nothing else uses any more (a node made by `blockdev-add` stays: the
/// monitor owns it).
pub(crate) fn delete_node(svc: &Service, b: Arc<dyn Bdev>) -> Result<(), RpcError> {
    let chain = node::chain(&b);
    if let Some(img) = node::image(&b) {
        let owner = img.owner();
        let b2 = b.clone();
        svc.rt
            .spawn_on(owner, move || async move {
                match b2.as_any().downcast_ref::<Qcow2Bdev>() {
                    Some(q) => q.close().await,
                    None => Ok(()),
                }
            })
            .block()??;
    }
    let mut above: Option<String> = None;
    for n in chain {
        let name = n.name().to_string();
        if let Some(a) = &above {
            registry().release(&name, a);
        }
        if !registry().contains(&name) || !registry().claims(&name).is_empty() {
            break;
        }
        if above.is_some() && monitor_owned(&name) {
            break;
        }
        delete_bdev(svc, &name)?;
        // The node's claims on bdevs outside its chain (the `base_bdev` it
        // was opened on, a snapshot target) end with it.
        for other in registry().list() {
            registry().release(other.name(), &name);
        }
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

//! Snapshots: a new qcow2 overlay whose backing file is the device's current
//! image, and the device moved onto it (quiesced, so clients notice nothing).
//! With a target on other storage (a malloc or NVMe bdev) followed by a stream,
//! this is a live block copy.

use crate::node;
use crate::Graph;
use bdev::device::Device;
use bdev::qcow2::{self, BackingSpec, CreateOptions, OpenOptions, Qcow2Bdev};
use bdev::{Bdev, BdevError, Claim, Holder};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// How the overlay comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotMode {
    /// Create it, recording the backing image's file name (QEMU's `absolute-paths`).
    #[default]
    Create,
    /// It exists already (made by the user); only open it over the current image.
    Existing,
}

/// A snapshot request.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequest {
    /// Device name.
    pub device: String,
    /// A file path, or the name of a registered bdev to format as qcow2.
    pub target: String,
    /// Node name of the overlay (default: `<device>-snapN`).
    pub node_name: Option<String>,
    /// Create or use an existing image.
    pub mode: SnapshotMode,
    /// O_DIRECT for a file target.
    pub direct: bool,
}

/// Why a snapshot failed.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// No device of that name.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// A bad request (the message says why).
    #[error("{0}")]
    Invalid(String),
    /// Creating or opening the overlay failed.
    #[error(transparent)]
    Bdev(#[from] BdevError),
}

static NEXT_SNAP: AtomicU64 = AtomicU64::new(0);

/// Refuses a new overlay file `target` that is a file of `root`'s chain
/// (the same file by device and inode, whatever the path says): creating it
/// would destroy the image the overlay is to read through. QEMU's words for
/// the top image; a missing `target` is no file of the chain.
pub fn check_outside_chain(root: &Arc<dyn Bdev>, target: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(t) = std::fs::metadata(target) else {
        return Ok(());
    };
    for (depth, b) in node::chain(root).iter().enumerate() {
        let file = node::filename_of(b);
        let Ok(m) = std::fs::metadata(&file) else {
            continue;
        };
        if (m.dev(), m.ino()) != (t.dev(), t.ino()) {
            continue;
        }
        return Err(SnapshotError::Invalid(if depth == 0 {
            "Error: Trying to create an image with the same filename as the backing file".into()
        } else {
            format!("Error: Trying to create an image over '{file}', an image of the backing chain")
        }));
    }
    Ok(())
}

/// The device named `name` and its reactor of choice for the overlay (the
/// current root's owner, so the chain's metadata stays on one reactor).
pub fn device_and_owner(g: &Graph, name: &str) -> Result<(Arc<dyn Bdev>, usize), SnapshotError> {
    let b = g
        .nodes()
        .get(name)
        .map_err(|_| SnapshotError::DeviceNotFound(name.into()))?;
    let d = Device::from_bdev(&b).ok_or_else(|| SnapshotError::DeviceNotFound(name.into()))?;
    let owner = node::image(&d.root()).map(|i| i.owner()).unwrap_or(0);
    Ok((b, owner))
}

/// Takes the snapshot; returns the overlay's node name. Run on a reactor (it
/// becomes the overlay's owner).
pub async fn snapshot(g: &Graph, req: SnapshotRequest) -> Result<String, SnapshotError> {
    let (dev_bdev, _) = device_and_owner(g, &req.device)?;
    let dev = Device::from_bdev(&dev_bdev)
        .ok_or_else(|| SnapshotError::DeviceNotFound(req.device.clone()))?;
    let rt = reactor::handle()
        .ok_or_else(|| SnapshotError::Invalid("snapshots are taken on a reactor".into()))?;
    let root = dev.root();
    let node_name = match &req.node_name {
        Some(n) => n.clone(),
        None => format!(
            "{}-snap{}",
            req.device,
            NEXT_SNAP.fetch_add(1, Ordering::Relaxed)
        ),
    };
    if g.nodes().contains(&node_name) {
        return Err(SnapshotError::Invalid(format!(
            "Duplicate nodes with node-name='{node_name}'"
        )));
    }
    let opts = CreateOptions {
        backing_file: Some(node::filename_of(&root)),
        backing_format: Some(node::format_of(&root)),
        ..CreateOptions::new(root.size())
    };
    let open_opts = OpenOptions {
        backing: BackingSpec::Bdev(root.clone()),
        nodes: Some(g.nodes().clone()),
        direct: req.direct,
        ..OpenOptions::default()
    };
    let overlay: Arc<Qcow2Bdev> = match g.nodes().get(&req.target) {
        Ok(target) if !Path::new(&req.target).exists() => {
            if !g.nodes().claims(&req.target).is_empty() {
                return Err(SnapshotError::Invalid(format!(
                    "bdev '{}' is in use",
                    req.target
                )));
            }
            if req.mode == SnapshotMode::Create {
                if target.size() < root.size() / 8 {
                    tracing::warn!(target = %req.target, "snapshot target is small; the copy may run out of space");
                }
                qcow2::create(target.clone(), &opts).await?;
            }
            let q = Qcow2Bdev::open(&node_name, target, open_opts).await?;
            g.nodes().claim(
                &req.target,
                Claim::file(Holder::Node(node_name.clone()), true),
            )?;
            q
        }
        _ => {
            let path = Path::new(&req.target);
            match req.mode {
                SnapshotMode::Create => {
                    check_outside_chain(&root, path)?;
                    qcow2::create_file(path, &opts).await?
                }
                SnapshotMode::Existing if !path.exists() => {
                    return Err(SnapshotError::Invalid(format!(
                        "Could not open '{}': No such file or directory",
                        req.target
                    )))
                }
                SnapshotMode::Existing => {}
            }
            qcow2::open_file(&node_name, path, open_opts).await?
        }
    };
    if overlay.size() != root.size() {
        return Err(SnapshotError::Invalid(format!(
            "the overlay has {} bytes, the device {}",
            overlay.size(),
            root.size()
        )));
    }
    let overlay: Arc<dyn Bdev> = overlay;
    let me = Holder::Node(node_name.clone());
    if let Err(e) = g.register(overlay.clone()) {
        g.nodes().release(&req.target, &me);
        return Err(e.into());
    }
    if g.nodes().contains(root.name()) {
        let _ = g.nodes().claim(root.name(), Claim::backing(me.clone()));
    }
    if let Err(e) = dev.swap_root(&rt, overlay.clone()).await {
        g.nodes().release(root.name(), &me);
        let _ = g.delete_from_reactor(&node_name);
        return Err(e.into());
    }
    lower_to_backing(&root);
    tracing::info!(device = %req.device, overlay = %node_name, target = %req.target, "snapshot taken");
    Ok(node_name)
}

/// `blockdev-snapshot`: puts the existing image node `overlay` (opened without
/// a backing file) on top of the device whose root is `node`.
pub async fn snapshot_existing_node(
    g: &Graph,
    node_name: &str,
    overlay_name: &str,
) -> Result<(), SnapshotError> {
    let rt = reactor::handle()
        .ok_or_else(|| SnapshotError::Invalid("snapshots are taken on a reactor".into()))?;
    let base = g
        .nodes()
        .get(node_name)
        .map_err(|_| SnapshotError::DeviceNotFound(node_name.into()))?;
    let dev_bdev = match Device::from_bdev(&base) {
        Some(_) => base.clone(),
        None => Device::find_by_root(g.nodes(), node_name).ok_or_else(|| {
            SnapshotError::Invalid(format!("Node '{node_name}' is not the root of a device"))
        })?,
    };
    let dev = Device::from_bdev(&dev_bdev)
        .ok_or_else(|| SnapshotError::DeviceNotFound(node_name.into()))?;
    let root = dev.root();
    let overlay = attach_overlay(g, &root, overlay_name).await?;
    dev.swap_root(&rt, overlay).await?;
    lower_to_backing(&root);
    Ok(())
}

/// `blockdev-snapshot` on a plain node (one that is no device's root): the
/// existing image node `overlay` (opened without a backing file) gets the
/// node as its backing, then every hidden device over the node (an NBD
/// export's) is moved onto the overlay. The caller has checked that nothing
/// else uses the node.
pub async fn snapshot_existing_plain(
    g: &Graph,
    node_name: &str,
    overlay_name: &str,
) -> Result<(), SnapshotError> {
    let rt = reactor::handle()
        .ok_or_else(|| SnapshotError::Invalid("snapshots are taken on a reactor".into()))?;
    let root = g
        .nodes()
        .get(node_name)
        .map_err(|_| SnapshotError::DeviceNotFound(node_name.into()))?;
    let overlay = attach_overlay(g, &root, overlay_name).await?;
    move_hidden(g, &rt, node_name, &overlay).await?;
    lower_to_backing(&root);
    Ok(())
}

/// The old top image, now the overlay's backing file, holds a backing
/// file's lock, as QEMU's old top does after its `external_snapshot_commit`
/// reopens it read-only: a writer's lock (read, write, resize; sharing
/// neither) becomes a reader's (read; sharing neither) in place, on the same
/// open file description, so no other process can take the file for writing
/// in between. Other processes may then read the file (`qemu-img info`,
/// `qemu-io -r`, another sluice's backing file). What writes a backing file
/// takes the writer's lock back for the moment: a stream into it and
/// `change-backing-file` ([`crate::lock::WriterLock`]), trimming its file at close
/// (`Qcow2Bdev::trim_file`).
pub fn lower_to_backing(old_top: &Arc<dyn Bdev>) {
    use bdev::lock::{Perms, PERM_WRITE};
    let r = match old_top.lock_perms() {
        Some(p) if p.perm & PERM_WRITE != 0 => old_top.set_lock_perms(Perms::READER),
        _ => return,
    };
    match r {
        Ok(_) => tracing::info!(node = %old_top.name(), "backing file now holds a reader's lock"),
        Err(e) => {
            tracing::warn!(node = %old_top.name(), error = %e, "backing file keeps its writer's lock")
        }
    }
}

/// Moves every hidden device whose root is `node_name` onto `overlay` (each
/// swap quiesced as a device's always is); returns how many moved. Run on a
/// reactor.
pub async fn move_hidden(
    g: &Graph,
    rt: &reactor::RuntimeHandle,
    node_name: &str,
    overlay: &Arc<dyn Bdev>,
) -> Result<usize, SnapshotError> {
    let mut n = 0;
    for b in Device::hidden_by_root(g.nodes(), node_name) {
        if let Some(d) = Device::from_bdev(&b) {
            d.swap_root(rt, overlay.clone()).await?;
            tracing::info!(export = %b.name(), from = %node_name, to = %overlay.name(), "moved onto the snapshot overlay");
            n += 1;
        }
    }
    Ok(n)
}

/// Links the image node `overlay_name` (without a backing yet) over `root`:
/// its header names `root`'s file as the backing file, reads fall through to
/// `root`, which the overlay claims.
async fn attach_overlay(
    g: &Graph,
    root: &Arc<dyn Bdev>,
    overlay_name: &str,
) -> Result<Arc<dyn Bdev>, SnapshotError> {
    let overlay = g
        .nodes()
        .get(overlay_name)
        .map_err(|_| SnapshotError::DeviceNotFound(overlay_name.into()))?;
    let img = node::image(&overlay).ok_or_else(|| {
        SnapshotError::Invalid(format!(
            "The overlay '{overlay_name}' does not support backing images"
        ))
    })?;
    if img.backing().is_some() {
        return Err(SnapshotError::Invalid(format!(
            "The overlay '{overlay_name}' already has a backing image"
        )));
    }
    if overlay.read_only() {
        return Err(SnapshotError::Invalid(format!(
            "The overlay '{overlay_name}' is read-only"
        )));
    }
    if overlay.size() != root.size() {
        return Err(SnapshotError::Invalid(format!(
            "The overlay '{overlay_name}' has {} bytes, the node '{}' {}",
            overlay.size(),
            root.name(),
            root.size()
        )));
    }
    img.set_backing_file(
        Some(&node::filename_of(root)),
        Some(&node::format_of(root)),
        true,
    )
    .await?;
    // The link claims `root` for the overlay.
    img.set_backing_bdev(Some(root.clone())).await?;
    Ok(overlay)
}

/// What a snapshot changed, to undo it when a later action of its
/// `transaction` fails (QEMU's `external_snapshot_abort`).
#[derive(Clone)]
pub struct SnapshotUndo {
    /// The old top (the device's root or the plain node).
    pub old: Arc<dyn Bdev>,
    /// The overlay now on top of it.
    pub overlay: Arc<dyn Bdev>,
    /// The device whose root moved (else the node's exports moved).
    pub device: Option<String>,
    /// The overlay existed before (`blockdev-snapshot`): unlink it from the
    /// old top rather than delete it.
    pub existing: bool,
    /// The old top's image-lock permissions before it was lowered.
    pub perms: Option<bdev::lock::Perms>,
    /// An existing overlay's header backing file and format before the link.
    pub header_backing: Option<(String, Option<String>)>,
    /// An existing overlay's `backing` in its monitor record before the link.
    pub backing_arg: Option<serde_json::Value>,
}

impl SnapshotUndo {
    /// What undoing a link of `overlay` over `old` needs, read before the link.
    pub fn new(
        old: Arc<dyn Bdev>,
        overlay: Arc<dyn Bdev>,
        device: Option<String>,
        existing: bool,
    ) -> SnapshotUndo {
        let header_backing = overlay
            .as_any()
            .downcast_ref::<Qcow2Bdev>()
            .and_then(|q| q.backing_file().map(|f| (f, q.backing_format())));
        SnapshotUndo {
            perms: old.lock_perms(),
            old,
            overlay,
            device,
            existing,
            header_backing,
            backing_arg: None,
        }
    }
}

/// Undoes a snapshot on a reactor: the device (or every export) moves back
/// onto the old top (quiesced), the old top's lock gets its permissions
/// back, and an existing overlay is unlinked (its header names no backing
/// file again). A created overlay is left to the caller to delete.
pub async fn undo(g: &Graph, u: &SnapshotUndo) -> Result<(), SnapshotError> {
    let rt = reactor::handle()
        .ok_or_else(|| SnapshotError::Invalid("snapshots are undone on a reactor".into()))?;
    match &u.device {
        Some(d) => {
            let b = g
                .nodes()
                .get(d)
                .map_err(|_| SnapshotError::DeviceNotFound(d.clone()))?;
            let dev =
                Device::from_bdev(&b).ok_or_else(|| SnapshotError::DeviceNotFound(d.clone()))?;
            dev.swap_root(&rt, u.old.clone()).await?;
        }
        None => {
            move_hidden(g, &rt, u.overlay.name(), &u.old).await?;
        }
    }
    if let Some(p) = u.perms {
        if let Err(e) = u.old.set_lock_perms(p) {
            tracing::warn!(node = %u.old.name(), error = %e, "old top keeps a reader's lock");
        }
    }
    if u.existing {
        if let Some(img) = node::image(&u.overlay) {
            img.set_backing_bdev(None).await?;
            let (f, fmt) = match &u.header_backing {
                Some((f, fmt)) => (Some(f.as_str()), fmt.as_deref()),
                None => (None, None),
            };
            img.set_backing_file(f, fmt, true).await?;
        }
    } else if u.device.is_some() {
        let me = Holder::Node(u.overlay.name().to_string());
        g.nodes().release(u.old.name(), &me);
        g.delete_from_reactor(u.overlay.name())?;
        g.release_all(&me);
    }
    Ok(())
}

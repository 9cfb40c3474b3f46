//! From a `blockdev-mirror` (or `drive-mirror`, once its target is open)
//! request to a plan, with QEMU's checks in its order and words
//! (`qmp_blockdev_mirror`, `blockdev_mirror_common`, `mirror_start_job`).

use super::core::Init;
use crate::job::{BlockJobArgs, JobError, JobManager, JobSpec, OnError};
use bdev::device::Device;
use bdev::{Bdev, Holder};
use graph::node;
use graph::Graph;
use std::sync::Arc;
use thiserror::Error;

/// QAPI `MirrorSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// What the whole chain shows.
    #[default]
    Full,
    /// What the source itself holds.
    Top,
    /// Only new writes.
    None,
    /// Needs a bitmap (refused: "not supported", as QEMU without one).
    Incremental,
    /// Needs a bitmap (refused likewise).
    Bitmap,
}

impl SyncMode {
    /// Parses the QAPI name.
    pub fn parse(s: &str) -> Option<SyncMode> {
        Some(match s {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            "incremental" => SyncMode::Incremental,
            "bitmap" => SyncMode::Bitmap,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// A mirror request.
#[derive(Default)]
pub struct MirrorParams {
    /// `job-id`, `speed`, `auto-finalize`, `auto-dismiss` (`on-error` unused).
    pub job: BlockJobArgs,
    /// The device or root node mirrored.
    pub device: String,
    /// The target node.
    pub target: String,
    /// The node the target replaces at the pivot (default: the source).
    pub replaces: Option<String>,
    /// `sync`.
    pub sync: SyncMode,
    /// Dirty map granularity (0: the default).
    pub granularity: u64,
    /// Bytes in flight (negative refused; 0: the default).
    pub buf_size: i64,
    /// `on-source-error` (default report).
    pub on_source: Option<OnError>,
    /// `on-target-error` (default report).
    pub on_target: Option<OnError>,
    /// `copy-mode: write-blocking`.
    pub write_blocking: bool,
    /// The target must be zeroed first (`blockdev-mirror` with `sync:
    /// full`; `drive-mirror` onto an existing image): everything is copied.
    pub zero_target: bool,
    /// The request opened the target itself (`drive-mirror`): it is
    /// released when the job ends unless a device moved onto it.
    pub release_target: bool,
}

/// Why a mirror cannot start.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MirrorError {
    /// A device or node name that names nothing.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NotFound(String),
    /// `replaces` names nothing.
    #[error("Failed to find node with node-name='{0}'")]
    ReplacesNotFound(String),
    /// Bad combination or value of parameters (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// Job creation refused (id, blockers).
    #[error(transparent)]
    Job(JobError),
}

/// What the job will do.
pub struct MirrorPlan {
    /// The node read.
    pub source: Arc<dyn Bdev>,
    /// The node written.
    pub target: Arc<dyn Bdev>,
    /// Every device (named or an export's) over the source.
    pub devices: Vec<Arc<dyn Bdev>>,
    /// What is copied first.
    pub init: Init,
    /// Dirty map granularity.
    pub granularity: u64,
    /// Bytes in flight.
    pub buf_size: u64,
    /// Error policies.
    pub on_source: OnError,
    /// See `on_source`.
    pub on_target: OnError,
    /// Start in write-blocking mode.
    pub write_blocking: bool,
    /// The reactor to run on.
    pub owner: usize,
    /// Released when the job ends unless in use.
    pub release_target: bool,
    /// The graph the nodes live in.
    pub graph: Arc<Graph>,
}

/// QEMU's default buffer (`DEFAULT_MIRROR_BUF_SIZE`).
pub const DEFAULT_BUF_SIZE: u64 = 16 << 20;

/// The node `name` is a backing file of, if any: the last one attached
/// (QEMU's op blockers are a list each new parent is put at the head of).
fn backing_user(g: &Graph, name: &str) -> Option<String> {
    g.nodes()
        .claims_of(name)
        .into_iter()
        .rev()
        .find_map(|c| match c.holder {
            Holder::Node(n) if c.role == "backing" => Some(n),
            _ => None,
        })
}

fn busy(g: &Graph, mgr: &JobManager, name: &str) -> Result<(), MirrorError> {
    if let Some(j) = mgr.job_on_node(name) {
        return Err(MirrorError::Job(JobError::NodeBusy {
            node: name.to_string(),
            job_type: j.spec().kind.as_str().into(),
        }));
    }
    if let Some(u) = backing_user(g, name) {
        return Err(MirrorError::Invalid(format!(
            "Node '{name}' is busy: node is used as backing hd of '{u}'"
        )));
    }
    Ok(())
}

/// The node a mirror reads, and the device named (if one was).
pub type Source = (Arc<dyn Bdev>, Option<Arc<dyn Bdev>>);

/// The node a mirror of `device` reads (a device's root, or a root node)
/// and the device, if one was named (QEMU's `qmp_get_root_bs`). A claim
/// held by the node `target` (`drive-mirror`'s new image over the source,
/// for `sync: none`) does not count as a parent.
pub fn source_of(
    g: &Graph,
    mgr: &JobManager,
    device: &str,
    target: Option<&str>,
) -> Result<Source, MirrorError> {
    let named = g
        .nodes()
        .get(device)
        .map_err(|_| MirrorError::NotFound(device.to_string()))?;
    let (source, dev) = match Device::from_bdev(&named) {
        Some(d) => (d.root(), Some(named.clone())),
        None => {
            let above = g
                .nodes()
                .claims_of(named.name())
                .iter()
                .any(|c| match &c.holder {
                    Holder::Node(n) => Some(n.as_str()) != target,
                    Holder::Job(_) => true,
                    _ => false,
                });
            if above {
                return Err(MirrorError::Invalid("Need a root block node".into()));
            }
            (named.clone(), None)
        }
    };
    if mgr.job_on_node(source.name()).is_some() {
        return Err(MirrorError::Invalid("Need a root block node".into()));
    }
    Ok((source, dev))
}

/// What QEMU refuses about the target once the job exists (its
/// `mirror_start_job` after `block_job_create`): a read-only node, or one a
/// front door (an export, a device) uses, whose reads the mirror's target
/// does not share.
pub fn target_refusal(g: &Graph, target: &Arc<dyn Bdev>) -> Option<String> {
    if target.read_only() {
        return Some("Block node is read-only".into());
    }
    let name = target.name();
    let user = g.nodes().claims_of(name).into_iter().find(|c| {
        matches!(c.holder, Holder::Export(_) | Holder::Device(_))
            && !c.perm.minus(bdev::Perm::NONE).is_empty()
    })?;
    let perms = if user.perm.minus(bdev::Perm::CONSISTENT_READ).is_empty() {
        "consistent read"
    } else {
        "consistent read, write"
    };
    let who = match &user.holder {
        Holder::Device(d) => format!("block device '{d}'"),
        _ => "an unnamed block device".to_string(),
    };
    Some(format!(
        "Permission conflict on node '{name}': permissions '{perms}' are both required by {who} (uses node '{name}' as 'root' child) and unshared by an unnamed block device (uses node '{name}' as 'root' child)."
    ))
}

/// Resolves and validates a request.
pub fn resolve(
    g: &Arc<Graph>,
    mgr: &JobManager,
    p: &MirrorParams,
) -> Result<(MirrorPlan, JobSpec), MirrorError> {
    let (source, device) = source_of(g, mgr, &p.device, Some(&p.target))?;
    let target = g
        .nodes()
        .get(&p.target)
        .map_err(|_| MirrorError::NotFound(p.target.clone()))?;
    busy(g, mgr, target.name())?;
    if matches!(p.sync, SyncMode::Incremental | SyncMode::Bitmap) {
        return Err(MirrorError::Invalid(format!(
            "Sync mode '{}' not supported",
            p.sync.name()
        )));
    }
    if p.granularity != 0 && !(512..=64 << 20).contains(&p.granularity) {
        return Err(MirrorError::Invalid(
            "Parameter 'granularity' expects a value in range [512B, 64MB]".into(),
        ));
    }
    if !p.granularity.is_power_of_two() && p.granularity != 0 {
        return Err(MirrorError::Invalid(
            "Parameter 'granularity' expects a power of 2".into(),
        ));
    }
    if let Some(r) = &p.replaces {
        let rb = g
            .nodes()
            .get(r)
            .map_err(|_| MirrorError::ReplacesNotFound(r.clone()))?;
        if let Some(u) = backing_user(g, rb.name()) {
            return Err(MirrorError::Invalid(format!(
                "Node '{r}' is busy: node is used as backing hd of '{u}'"
            )));
        }
        if !node::same(&rb, &source) {
            return Err(MirrorError::Invalid(format!(
                "Cannot replace '{r}' by a node mirrored from '{}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
                source.name()
            )));
        }
    }
    if node::same(&source, &target) {
        return Err(MirrorError::Invalid("Can't mirror node into itself".into()));
    }
    if p.buf_size < 0 {
        return Err(MirrorError::Invalid("Invalid parameter 'buf-size'".into()));
    }
    let job_id = p.job.id(device.as_ref()).map_err(MirrorError::Job)?;
    if mgr.job(&job_id).is_ok() {
        return Err(MirrorError::Job(JobError::IdInUse(job_id)));
    }
    let granularity = match p.granularity {
        // QEMU's default: the target's cluster size, at least 64 KiB... at
        // most 64 KiB (`bdrv_get_default_bitmap_granularity`).
        0 => node::image(&target)
            .map_or(64 << 10, |i| i.cluster_size())
            .clamp(4096, 64 << 10),
        n => n,
    };
    let buf_size = match p.buf_size {
        0 => DEFAULT_BUF_SIZE,
        n => (n as u64).max(granularity),
    };
    let init = match p.sync {
        SyncMode::None => Init::Nothing,
        SyncMode::Top => Init::Above(node::backing_of(&source)),
        _ if p.zero_target => Init::All,
        _ => Init::Above(None),
    };
    let mut devices: Vec<Arc<dyn Bdev>> = Device::hidden_by_root(g.nodes(), source.name());
    devices.extend(Device::find_by_root(g.nodes(), source.name()));
    let owner = node::image(&source).map_or(0, |i| i.owner());
    let spec_device = device
        .as_ref()
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| p.device.clone());
    let nodes = vec![source.name().to_string(), target.name().to_string()];
    let mut spec = p.job.spec(job_id, super::KIND, spec_device, false, nodes);
    // A negative speed is refused once the job exists (QEMU's order).
    spec.speed = 0;
    let plan = MirrorPlan {
        source,
        target,
        devices,
        init,
        granularity,
        buf_size,
        on_source: p.on_source.unwrap_or(OnError::Report),
        on_target: p.on_target.unwrap_or(OnError::Report),
        write_blocking: p.write_blocking,
        owner,
        release_target: p.release_target,
        graph: g.clone(),
    };
    Ok((plan, spec))
}

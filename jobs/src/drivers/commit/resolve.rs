//! From a `block-commit` request to a plan: which nodes, which base, which
//! job id, with QEMU's checks (`qmp_block_commit`, `commit_start`) in its
//! order and words.

use crate::job::{BlockJobArgs, JobError, JobManager, JobSpec};
use bdev::device::Device;
use bdev::{Bdev, Holder};
use graph::lock::WriterLock;
use graph::node::{self, ImageNode};
use graph::{qemu_name, Graph};
use std::sync::Arc;
use thiserror::Error;

/// A `block-commit` request.
#[derive(Debug, Clone, Default)]
pub struct CommitParams {
    /// `job-id`, `speed`, `on-error`, `auto-finalize`, `auto-dismiss`.
    pub job: BlockJobArgs,
    /// The root of the chain (device or node name).
    pub device: String,
    /// The topmost layer committed, by node name (default: the active layer).
    pub top_node: Option<String>,
    /// The topmost layer committed, by file name.
    pub top: Option<String>,
    /// The layer committed into, by node name (default: the chain's bottom).
    pub base_node: Option<String>,
    /// The layer committed into, by file name.
    pub base: Option<String>,
    /// Backing file name recorded above top instead of base's file name.
    pub backing_file: Option<String>,
    /// Record `raw` as the backing format where base is a protocol node.
    pub backing_mask_protocol: bool,
}

/// Why a commit cannot start.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// `device` names nothing (QMP class DeviceNotFound: libvirt probes it).
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// A node name that names nothing.
    #[error("Cannot find device='{device}' nor node-name='{node}'")]
    NotFound { device: String, node: String },
    /// Bad combination or value of parameters (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// A layer the job writes (base, the image above top) is read-only and
    /// its driver cannot reopen it read-write (QEMU's
    /// `bdrv_can_set_read_only`).
    #[error("Node '{0}' is read only")]
    ReadOnly(String),
    /// Job creation refused (id, blockers).
    #[error(transparent)]
    Job(JobError),
}

/// What the job will do.
pub struct CommitPlan {
    /// The topmost layer committed.
    pub top: Arc<dyn ImageNode>,
    /// The top as a bdev.
    pub top_bdev: Arc<dyn Bdev>,
    /// The layer committed into.
    pub base: Arc<dyn Bdev>,
    /// The image above top, whose backing becomes base (None: top is the
    /// active layer, an active commit).
    pub overlay: Option<Arc<dyn ImageNode>>,
    /// Every device (named or an export's) whose root is top: an active
    /// commit tracks their writes and moves them onto base.
    pub roots_of: Vec<Arc<dyn Bdev>>,
    /// Name recorded in the overlay's header for base.
    pub backing_file: String,
    /// Format recorded with it.
    pub backing_format: String,
    /// Layers from top down to base (excluded): released when unused.
    pub intermediates: Vec<Arc<dyn Bdev>>,
    /// The reactor to run on.
    pub owner: usize,
    /// The front door the chain is behind (quiesced for the relink; its
    /// clients are yielded to).
    pub device: Option<Arc<dyn Bdev>>,
    /// Writer's locks of base and the overlay for the job's life.
    pub writers: Vec<WriterLock>,
    /// The graph the nodes live in.
    pub graph: Arc<Graph>,
}

fn lookup(g: &Graph, node: &str) -> Result<Arc<dyn Bdev>, CommitError> {
    g.nodes().get(node).map_err(|_| CommitError::NotFound {
        device: String::new(),
        node: node.to_string(),
    })
}

/// QEMU's `bdrv_is_root_node`: no node above it and no job on it.
fn is_root(g: &Graph, mgr: &JobManager, b: &Arc<dyn Bdev>) -> bool {
    let above = g
        .nodes()
        .claims_of(b.name())
        .iter()
        .any(|c| matches!(c.holder, Holder::Node(_) | Holder::Job(_)));
    !above && mgr.job_on_node(b.name()).is_none()
}

/// Resolves and validates a request (QEMU's `qmp_block_commit` and
/// `commit_start`).
pub fn resolve(
    g: &Arc<Graph>,
    mgr: &JobManager,
    p: &CommitParams,
) -> Result<(CommitPlan, JobSpec), CommitError> {
    let named = g
        .nodes()
        .get(&p.device)
        .map_err(|_| CommitError::DeviceNotFound(p.device.clone()))?;
    let (bs, device) = match Device::from_bdev(&named) {
        Some(d) => (d.root(), Some(named.clone())),
        None => {
            if !is_root(g, mgr, &named) {
                return Err(CommitError::Invalid("Need a root block node".into()));
            }
            let dev = Device::find_by_root(g.nodes(), named.name());
            (named.clone(), dev)
        }
    };
    if mgr.job_on_node(bs.name()).is_some() {
        return Err(CommitError::Invalid("Need a root block node".into()));
    }
    let chain = node::chain(&bs);
    let position = |b: &Arc<dyn Bdev>| chain.iter().position(|c| node::same(c, b));

    let ti = match (&p.top_node, &p.top) {
        (Some(_), Some(_)) => {
            return Err(CommitError::Invalid(
                "'top-node' and 'top' are mutually exclusive".into(),
            ))
        }
        (Some(name), None) => position(&lookup(g, name)?).ok_or_else(|| {
            CommitError::Invalid(format!("'{name}' is not in this backing file chain"))
        })?,
        (None, Some(name)) => {
            if node::filename_of(&bs) == *name {
                0
            } else {
                (1..chain.len())
                    .find(|&i| crate::drivers::stream::matches_file(&chain[i], &chain[i - 1], name))
                    .ok_or_else(|| {
                        CommitError::Invalid(format!("Top image file {name} not found"))
                    })?
            }
        }
        (None, None) => 0,
    };
    let bi = match (&p.base_node, &p.base) {
        (Some(_), Some(_)) => {
            return Err(CommitError::Invalid(
                "'base-node' and 'base' are mutually exclusive".into(),
            ))
        }
        (Some(name), None) => position(&lookup(g, name)?)
            .filter(|&i| i >= ti)
            .ok_or_else(|| {
                CommitError::Invalid(format!("'{name}' is not in this backing file chain"))
            })?,
        (None, Some(name)) => (ti + 1..chain.len())
            .find(|&i| crate::drivers::stream::matches_file(&chain[i], &chain[i - 1], name))
            .ok_or_else(|| {
                CommitError::Invalid(format!("Can't find '{name}' in the backing chain"))
            })?,
        (None, None) => chain.len() - 1,
    };
    for b in &chain[ti..=bi] {
        if let Some(j) = mgr.job_on_node(b.name()) {
            return Err(CommitError::Job(JobError::NodeBusy {
                node: b.name().to_string(),
                job_type: j.spec().kind.as_str().into(),
            }));
        }
    }
    if ti == bi {
        return Err(CommitError::Invalid(
            "cannot commit an image into itself".into(),
        ));
    }
    if ti == 0 && p.backing_file.is_some() {
        return Err(CommitError::Invalid(
            "'backing-file' specified, but 'top' is the active layer".into(),
        ));
    }
    let job_id = p.job.id(device.as_ref()).map_err(CommitError::Job)?;
    if mgr.job(&job_id).is_ok() {
        return Err(CommitError::Job(JobError::IdInUse(job_id)));
    }
    p.job.speed().map_err(CommitError::Invalid)?;
    let top_bdev = chain[ti].clone();
    let base = chain[bi].clone();
    let Some(top) = node::image(&top_bdev) else {
        return Err(CommitError::Invalid(format!(
            "'{}' has no backing chain",
            top_bdev.name()
        )));
    };
    let overlay = match ti {
        0 => None,
        _ => Some(node::image(&chain[ti - 1]).ok_or_else(|| {
            CommitError::Invalid(format!("'{}' has no backing chain", chain[ti - 1].name()))
        })?),
    };
    if ti == 0 && base.size() != top_bdev.size() {
        return Err(CommitError::Invalid(format!(
            "The active layer {} and base {} differ in size: the device cannot move onto base",
            node::filename_of(&top_bdev),
            node::filename_of(&base)
        )));
    }
    if base.size() < top_bdev.size() {
        return Err(CommitError::Invalid(format!(
            "Top image {} is larger than base image {}, and resize of base image is not supported",
            node::filename_of(&top_bdev),
            node::filename_of(&base)
        )));
    }
    let described = qemu_name::describe(&base);
    let backing_file = p
        .backing_file
        .clone()
        .unwrap_or_else(|| qemu_name::filename(&described));
    let protocol = !matches!(described, qemu_name::QemuNode::Format { .. });
    let backing_format = if p.backing_mask_protocol && protocol {
        "raw".to_string()
    } else {
        qemu_name::driver(&described).to_string()
    };
    let nodes: Vec<String> = chain[..=bi].iter().map(|b| b.name().to_string()).collect();
    let mut roots_of: Vec<Arc<dyn Bdev>> = Device::hidden_by_root(g.nodes(), bs.name());
    roots_of.extend(Device::find_by_root(g.nodes(), bs.name()));
    let plan = CommitPlan {
        roots_of,
        owner: top.owner(),
        top,
        top_bdev,
        base,
        overlay,
        backing_file,
        backing_format,
        intermediates: chain[ti..bi].to_vec(),
        device: device.clone().or_else(|| {
            Device::hidden_by_root(g.nodes(), bs.name())
                .into_iter()
                .next()
        }),
        writers: Vec::new(),
        graph: g.clone(),
    };
    let device = device
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| p.device.clone());
    let spec = p.job.spec(job_id, super::KIND, device, false, nodes);
    Ok((plan, spec))
}

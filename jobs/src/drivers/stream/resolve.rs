//! From a `block-stream` request to a plan: which nodes, which base, which job
//! id, with QEMU's checks and messages.

use crate::job::{BlockJobArgs, JobError, JobManager, JobSpec};
use bdev::device::Device;
use bdev::Bdev;
use graph::node::{self, ImageNode};
use graph::qemu_name;
use graph::Graph;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// A `block-stream` (or `block_stream`) request.
#[derive(Debug, Clone, Default)]
pub struct StreamParams {
    /// `job-id`, `speed`, `on-error`, `auto-finalize`, `auto-dismiss`.
    pub job: BlockJobArgs,
    /// Device or node name of the top image.
    pub device: String,
    /// Base image by file name.
    pub base: Option<String>,
    /// Base image by node name.
    pub base_node: Option<String>,
    /// The last node to stream from (its backing becomes the base).
    pub bottom: Option<String>,
    /// Backing file name to record instead of the base's file name.
    pub backing_file: Option<String>,
    /// Record `raw` as the backing format where the base is a protocol node
    /// (`file`, `null-co`...), not its driver (`backing-mask-protocol`).
    pub backing_mask_protocol: bool,
    /// Started through the 2011 API.
    pub legacy: bool,
    /// Skip the flush that makes the copy durable before the header drops the
    /// backing file (`x-durable: false`); see docs/streaming.md.
    pub no_flush_on_complete: bool,
}

/// Why a stream cannot start.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// No device or node of that name.
    #[error("Cannot find device='{device}' nor node-name='{node}'")]
    NotFound { device: String, node: String },
    /// Bad combination or value of parameters (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// The top image cannot be written.
    #[error("Block node is read-only")]
    ReadOnly,
    /// Job creation refused (id, blockers).
    #[error(transparent)]
    Job(JobError),
}

/// What the job will do.
#[derive(Clone)]
pub struct StreamPlan {
    /// The image written to.
    pub top: Option<Arc<dyn ImageNode>>,
    /// The top as a bdev.
    pub top_bdev: Arc<dyn Bdev>,
    /// The new backing (None: the whole chain is streamed).
    pub base: Option<Arc<dyn Bdev>>,
    /// Name recorded in the header for `base`.
    pub backing_file: Option<String>,
    /// Format recorded in the header for `base`.
    pub backing_format: Option<String>,
    /// Nodes from the top's backing down to the base (excluded): released on success.
    pub intermediates: Vec<Arc<dyn Bdev>>,
    /// Nothing to copy (the base is right below the top, or there is no backing).
    pub noop: bool,
    /// The reactor to run on.
    pub owner: usize,
    /// The device the top is the root of (for yielding to clients and quiescing).
    pub device: Option<Arc<dyn Bdev>>,
    /// Make the copy durable before the header changes (the default).
    pub durable: bool,
    /// The top is a backing file (it holds a reader's lock since a snapshot)
    /// that [`super::start`] gave a writer's lock for the job, as QEMU's
    /// `stream_start` reopens it read-write: lowered again when the guard
    /// is dropped, as the job ends.
    pub writer: Option<Arc<graph::lock::WriterLock>>,
    /// The graph the nodes live in (the final backing change releases there).
    pub graph: Arc<Graph>,
}

fn lookup(g: &Graph, device: Option<&str>, node: &str) -> Result<Arc<dyn Bdev>, StreamError> {
    g.nodes().get(node).map_err(|_| StreamError::NotFound {
        device: device.unwrap_or("").to_string(),
        node: node.to_string(),
    })
}

/// Whether `b` is the image a `base` file name designates.
pub(crate) fn matches_file(b: &Arc<dyn Bdev>, above: &Arc<dyn Bdev>, name: &str) -> bool {
    let f = node::filename_of(b);
    if f == name || b.name() == name {
        return true;
    }
    if node::image(above).and_then(|i| i.backing_file()).as_deref() == Some(name) {
        return true;
    }
    match (
        std::fs::canonicalize(Path::new(&f)),
        std::fs::canonicalize(Path::new(name)),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Resolves and validates a request (QEMU's `qmp_block_stream` and `stream_start`).
pub fn resolve(
    g: &Arc<Graph>,
    mgr: &JobManager,
    p: &StreamParams,
) -> Result<(StreamPlan, JobSpec), StreamError> {
    if p.base.is_some() && p.base_node.is_some() {
        return Err(StreamError::Invalid(
            "'base' and 'base-node' cannot be specified at the same time".into(),
        ));
    }
    if p.base.is_some() && p.bottom.is_some() {
        return Err(StreamError::Invalid(
            "'base' and 'bottom' cannot be specified at the same time".into(),
        ));
    }
    if p.bottom.is_some() && p.base_node.is_some() {
        return Err(StreamError::Invalid(
            "'bottom' and 'base-node' cannot be specified at the same time".into(),
        ));
    }
    let named = lookup(g, Some(&p.device), &p.device)?;
    let (top, device) = match Device::from_bdev(&named) {
        Some(d) => (d.root(), Some(named.clone())),
        None => {
            let dev = Device::find_by_root(g.nodes(), named.name());
            (named.clone(), dev)
        }
    };
    let chain = node::chain(&top);
    let position = |b: &Arc<dyn Bdev>| chain.iter().position(|c| node::same(c, b));

    let mut base: Option<Arc<dyn Bdev>> = None;
    if let Some(name) = &p.base {
        let i = (1..chain.len()).find(|&i| matches_file(&chain[i], &chain[i - 1], name));
        match i {
            Some(i) => base = Some(chain[i].clone()),
            None => {
                return Err(StreamError::Invalid(format!(
                    "Can't find '{name}' in the backing chain"
                )))
            }
        }
    }
    if let Some(name) = &p.base_node {
        let b = lookup(g, None, name)?;
        if position(&b).is_none_or(|i| i == 0) {
            return Err(StreamError::Invalid(format!(
                "Node '{name}' is not a backing image of '{}'",
                p.device
            )));
        }
        base = Some(b);
    }
    if let Some(name) = &p.bottom {
        let b = lookup(g, None, name)?;
        let Some(i) = position(&b) else {
            return Err(StreamError::Invalid(format!(
                "Node '{name}' is not in a chain starting from '{}'",
                p.device
            )));
        };
        base = chain.get(i + 1).cloned();
    }
    // Nodes the job works on: the top down to the base (excluded).
    let end = base.as_ref().and_then(position).unwrap_or(chain.len());
    let nodes: Vec<String> = chain[..end].iter().map(|b| b.name().to_string()).collect();
    for n in &nodes {
        if let Some(j) = mgr.job_on_node(n) {
            return Err(StreamError::Job(JobError::NodeBusy {
                node: n.clone(),
                job_type: j.spec().kind.as_str().into(),
            }));
        }
    }
    if base.is_none() && p.backing_file.is_some() {
        return Err(StreamError::Invalid(
            "backing file specified, but streaming the entire chain".into(),
        ));
    }
    let job_id = p.job.id(device.as_ref()).map_err(StreamError::Job)?;
    p.job.speed().map_err(StreamError::Invalid)?;
    if top.read_only() {
        return Err(StreamError::ReadOnly);
    }
    let image = node::image(&top);
    let noop = end <= 1;
    let described = base.as_ref().map(qemu_name::describe);
    let backing_file = described.as_ref().map(|n| {
        p.backing_file
            .clone()
            .unwrap_or_else(|| qemu_name::filename(n))
    });
    // QEMU's stream_prepare: the base's driver, or `raw` for a protocol
    // driver when masked.
    let backing_format = described.as_ref().map(|n| {
        let protocol = !matches!(n, qemu_name::QemuNode::Format { .. });
        if p.backing_mask_protocol && protocol {
            "raw".to_string()
        } else {
            qemu_name::driver(n).to_string()
        }
    });
    let owner = image.as_ref().map(|i| i.owner()).unwrap_or(0);
    let plan = StreamPlan {
        top: image,
        top_bdev: top.clone(),
        base,
        backing_file,
        backing_format,
        intermediates: chain[1..end.max(1)].to_vec(),
        noop,
        owner,
        // A plain node's NBD export goes through a hidden device: the job
        // yields to its clients and quiesces it for the switch.
        device: device.clone().or_else(|| {
            Device::hidden_by_root(g.nodes(), top.name())
                .into_iter()
                .next()
        }),
        durable: !p.no_flush_on_complete,
        writer: None,
        graph: g.clone(),
    };
    let device = device
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| p.device.clone());
    let spec = p.job.spec(job_id, super::KIND, device, p.legacy, nodes);
    Ok((plan, spec))
}

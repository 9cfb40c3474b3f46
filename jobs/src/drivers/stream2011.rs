//! The 2011 streaming API (`block_stream`, `block_stream_cancel`,
//! `query-block-stream`) over the stream driver: a stream job whose id is
//! the device name and whose spec says `legacy` (the control plane then also
//! announces its end as `BLOCK_STREAM_COMPLETED`).

use super::stream::{self, StreamError, StreamParams};
use crate::copy::Tuning;
use crate::job::{BlockJobArgs, Job, JobManager, JobStatus};
use bdev::device::Device;
use graph::node;
use reactor::RuntimeHandle;
use std::sync::Arc;
use thiserror::Error;

/// Errors as the 2011 API names them.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LegacyError {
    /// No device of that name.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// Already streaming, or a cancel is in progress.
    #[error("Device '{0}' is in use")]
    DeviceInUse(String),
    /// Nothing to stream from (the image has no backing file).
    #[error("Not supported")]
    NotSupported,
    /// No stream to cancel.
    #[error("Device '{0}' has not been activated")]
    DeviceNotActive(String),
    /// Any other refusal (a bad base).
    #[error(transparent)]
    Stream(StreamError),
}

fn active(j: &Job) -> bool {
    j.spec().kind == stream::KIND && !matches!(j.status(), JobStatus::Concluded | JobStatus::Null)
}

/// The active stream job on `device`, if any.
fn stream_on(mgr: &JobManager, device: &str) -> Option<Arc<Job>> {
    mgr.list()
        .into_iter()
        .find(|j| active(j) && j.spec().device == device)
}

fn device_root(g: &graph::Graph, device: &str) -> Result<Arc<dyn bdev::Bdev>, LegacyError> {
    let b = g
        .nodes()
        .get(device)
        .map_err(|_| LegacyError::DeviceNotFound(device.into()))?;
    Device::from_bdev(&b)
        .map(|d| d.root())
        .ok_or_else(|| LegacyError::DeviceNotFound(device.into()))
}

/// `block_stream`: starts streaming `device` (down to `base`) and returns at once.
pub fn block_stream(
    g: &Arc<graph::Graph>,
    mgr: &JobManager,
    rt: &RuntimeHandle,
    device: &str,
    base: Option<String>,
    tuning: Tuning,
) -> Result<(), LegacyError> {
    let root = device_root(g, device)?;
    if stream_on(mgr, device).is_some() {
        return Err(LegacyError::DeviceInUse(device.into()));
    }
    if node::backing_of(&root).is_none() {
        return Err(LegacyError::NotSupported);
    }
    let p = StreamParams {
        job: BlockJobArgs {
            job_id: Some(device.into()),
            ..Default::default()
        },
        device: device.into(),
        base,
        legacy: true,
        ..Default::default()
    };
    stream::start(g, mgr, rt, p, tuning).map_err(|e| match e {
        StreamError::Job(crate::job::JobError::IdInUse(_))
        | StreamError::Job(crate::job::JobError::NodeBusy { .. }) => {
            LegacyError::DeviceInUse(device.into())
        }
        other => LegacyError::Stream(other),
    })?;
    Ok(())
}

/// `block_stream_cancel`: stops the stream on `device`; resolves (through the
/// returned receiver) once the job has stopped. The image keeps its backing file.
pub fn block_stream_cancel(
    g: &graph::Graph,
    mgr: &JobManager,
    device: &str,
) -> Result<futures::channel::oneshot::Receiver<()>, LegacyError> {
    device_root(g, device)?;
    let job = stream_on(mgr, device).ok_or_else(|| LegacyError::DeviceNotActive(device.into()))?;
    if job.is_cancelled() {
        return Err(LegacyError::DeviceInUse(device.into()));
    }
    job.cancel()
        .map_err(|_| LegacyError::DeviceNotActive(device.into()))
}

/// One active stream, as `query-block-stream` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The device.
    pub device: String,
    /// Bytes to stream.
    pub len: u64,
    /// Bytes streamed.
    pub offset: u64,
}

/// `query-block-stream`: every active stream.
pub fn query_block_stream(mgr: &JobManager) -> Vec<StreamInfo> {
    mgr.list()
        .into_iter()
        .filter(|j| active(j))
        .map(|j| {
            let (offset, len) = j.progress();
            StreamInfo {
                device: j.spec().device.clone(),
                len,
                offset,
            }
        })
        .collect()
}

//! QEMU's arguments common to every block job (`job-id`, `speed`,
//! `on-error`, `auto-finalize`, `auto-dismiss`), with their defaults and
//! checks stated once for every driver's resolution.

use super::{id_wellformed, JobError, JobKind, JobSpec, OnError, SharedLimit};
use bdev::Bdev;
use std::sync::Arc;

/// The common block-job arguments of a request.
#[derive(Debug, Clone, Default)]
pub struct BlockJobArgs {
    /// Job id (default: the device name).
    pub job_id: Option<String>,
    /// Bytes/s (negative is refused).
    pub speed: i64,
    /// Error policy (default report).
    pub on_error: Option<OnError>,
    /// Default true.
    pub auto_finalize: Option<bool>,
    /// Default true.
    pub auto_dismiss: Option<bool>,
    /// sluice's extension `x-throttle-group`: a throttle group object whose
    /// limits the job's copying shares with every other member (jobs,
    /// devices, throttle nodes). Only the copier's jobs (stream, intermediate
    /// commit) take it.
    pub throttle: Option<Arc<bdev::throttle::GroupUse>>,
    /// `filter-node-name` (stream, commit, mirror): the name of the filter
    /// node shown above the job's node while it runs (`filter.rs`).
    pub filter_node_name: Option<String>,
}

impl BlockJobArgs {
    /// The job's id: the one given, else the name of the device the job works
    /// on (QEMU's default), refused when it is not a well-formed id.
    pub fn id(&self, device: Option<&Arc<dyn Bdev>>) -> Result<String, JobError> {
        let id = match &self.job_id {
            Some(id) => id.clone(),
            None => device.map(|d| d.name().to_string()).unwrap_or_default(),
        };
        if !id_wellformed(&id) {
            return Err(JobError::InvalidId(id));
        }
        Ok(id)
    }

    /// The speed; a negative one is refused in QEMU's words.
    pub fn speed(&self) -> Result<u64, String> {
        u64::try_from(self.speed)
            .map_err(|_| "Parameter 'speed' expects a non-negative value".to_string())
    }

    /// The job's spec: these arguments with their defaults (report,
    /// auto-finalize, auto-dismiss), for a job of `kind` with id `id` on
    /// `device` using `nodes`.
    pub fn spec(
        &self,
        id: String,
        kind: JobKind,
        device: String,
        legacy: bool,
        nodes: Vec<String>,
    ) -> JobSpec {
        JobSpec {
            id,
            kind,
            device,
            speed: self.speed.max(0) as u64,
            on_error: self.on_error.unwrap_or(OnError::Report),
            auto_finalize: self.auto_finalize.unwrap_or(true),
            auto_dismiss: self.auto_dismiss.unwrap_or(true),
            legacy,
            nodes,
            throttle: self.throttle.clone().map(SharedLimit),
        }
    }
}

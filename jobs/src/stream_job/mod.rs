//! The stream job: copy into the top image what its backing chain above `base`
//! holds, then drop the backing file (or point it at `base`).
//!
//! [`start`] resolves and validates the request as QEMU's `qmp_block_stream`
//! does, creates the job and spawns [`run`] on the reactor that owns the top
//! image's metadata.

mod copy;
mod resolve;
mod run;

pub use resolve::{resolve, StreamError, StreamParams, StreamPlan};
pub use run::{run, Tuning};

use crate::job::{Job, JobManager};
use reactor::RuntimeHandle;
use std::sync::Arc;

/// Validates `p`, creates the job and starts it. Returns at once.
pub fn start(
    g: &Arc<graph::Graph>,
    mgr: &JobManager,
    rt: &RuntimeHandle,
    p: StreamParams,
    tuning: Tuning,
) -> Result<Arc<Job>, StreamError> {
    let (mut plan, spec) = resolve(g, mgr, &p)?;
    // A top that is a backing file is written by the job: QEMU's
    // `stream_start` reopens it read-write, taking a writer's lock.
    let writer = graph::lock::WriterLock::raise(&plan.top_bdev)
        .map_err(|e| StreamError::Invalid(e.to_string()))?;
    let job = mgr.create(spec).map_err(StreamError::Job)?;
    plan.writer = Some(Arc::new(writer));
    let owner = plan.owner;
    // The length is known before the command returns (QEMU's job sets it on
    // its first run, inside the command), so a query right after sees it.
    if !plan.noop {
        job.set_len(plan.top_bdev.size());
    }
    // Running by the time the command returns, as in QEMU.
    job.start();
    let j = job.clone();
    let h = rt.spawn_on(owner, move || run(j, plan, tuning));
    drop(h);
    Ok(job)
}

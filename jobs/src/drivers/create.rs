//! The create driver: QEMU's `blockdev-create` as a job of type `create`
//! (`block/create.c`). Created and running before the command returns, then
//! waiting, pending and concluded (auto-finalize on, auto-dismiss off: the
//! client dismisses it), or aborting and concluded with the error in
//! `query-jobs`. Progress is 0/1 then 1/1, as QEMU's. Not a block job: it is
//! announced by status changes only.
//!
//! What is created and how is the control plane's (it knows the node table);
//! it hands over the creation as a future factory, which this driver runs as
//! a task on a reactor (the qcow2 creation I/O is async; nothing here blocks
//! the reactor on another).

use crate::job::{self, Job, JobDriver, JobError, JobKind, JobManager, JobSpec, OnError, Step};
use reactor::RuntimeHandle;
use std::sync::Arc;

/// The job type.
pub const KIND: JobKind = JobKind {
    name: "create",
    block_job: false,
};

/// The reactor creations run on.
pub const REACTOR: usize = 0;

/// A creation: called once on the job's reactor; its error is the job's.
pub type Creation = Box<dyn FnOnce() -> Step<'static, Result<(), String>> + Send>;

/// The create job's driver.
pub struct CreateDriver {
    work: Option<Creation>,
}

impl JobDriver for CreateDriver {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        let work = self.work.take();
        Box::pin(async move {
            let r = match work {
                Some(w) => w().await,
                None => Ok(()),
            };
            job.add_progress(1);
            match &r {
                Ok(()) => tracing::info!(job = job.id(), "blockdev-create done"),
                Err(e) => tracing::warn!(job = job.id(), "blockdev-create failed: {e}"),
            }
            r
        })
    }
}

/// Creates the job `id` and starts `work` on [`REACTOR`]. Returns at once.
pub fn start(
    mgr: &JobManager,
    rt: &RuntimeHandle,
    id: &str,
    work: Creation,
) -> Result<Arc<Job>, JobError> {
    let spec = JobSpec {
        id: id.to_string(),
        kind: KIND,
        device: id.to_string(),
        speed: 0,
        on_error: OnError::Report,
        auto_finalize: true,
        auto_dismiss: false,
        legacy: false,
        nodes: Vec::new(),
        throttle: None,
    };
    let driver = CreateDriver { work: Some(work) };
    job::start(mgr, rt, spec, REACTOR, Some(1), driver)
}

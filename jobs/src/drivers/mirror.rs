//! The mirror driver (QEMU's `blockdev-mirror` / `drive-mirror`,
//! `block/mirror.c`): copy what a device shows onto a target node, keep
//! copying what clients write, `ready` once in sync, and at
//! `block-job-complete` move every device over the source (named, or an
//! export's) onto the target.
//!
//! [`resolve`] (`resolve.rs`) checks a request as QEMU's
//! `qmp_blockdev_mirror` / `blockdev_mirror_common` / `mirror_start_job`
//! do, in their order and words. [`start`] attaches the dirty map to the
//! devices and starts the job on the reactor owning the source's metadata.
//! The copy itself is the mirror core (`core.rs`): the same machinery as
//! the active commit's.
//!
//! - `sync: full` copies what the whole chain shows (everything when the
//!   target must be zeroed, as `blockdev-mirror` asks), `top` what the
//!   source itself holds (the target's backing supplies the rest), `none`
//!   only what is written from now on.
//! - Source and target of different sizes fail the job once it runs
//!   ("Source and target image have different sizes"), as QEMU's do.
//! - Cancel before ready: the target is left as it is. Once ready, a
//!   cancel without `force` completes the job without the pivot (the target
//!   is then a consistent copy of that moment); with `force` it cancels.
//! - A target the job made (`drive-mirror`) is released at the end unless
//!   a device moved onto it.

pub mod core;
mod resolve;

pub use self::core::{CopyMode, Init, Mirror, Setup};
pub use resolve::{resolve, source_of, MirrorError, MirrorParams, MirrorPlan, SyncMode};

use crate::copy::Tuning;
use crate::job::filter::{FilterNode, Filtered};
use crate::job::{self, Job, JobDriver, JobKind, JobManager, JobSpec, Step};
use bdev::filter::FilterKind;
use graph::Graph;
use reactor::RuntimeHandle;
use std::sync::Arc;

/// The job type.
pub const KIND: JobKind = JobKind {
    name: "mirror",
    block_job: true,
};

/// Validates `p`, creates the job and starts it. Returns at once.
pub fn start(
    g: &Arc<Graph>,
    mgr: &JobManager,
    rt: &RuntimeHandle,
    p: MirrorParams,
    tuning: Tuning,
) -> Result<Arc<Job>, MirrorError> {
    let (plan, spec) = resolve(g, mgr, &p)?;
    // QEMU's mirror_top node comes before the job (a bad name: no job).
    let filter = match &p.job.filter_node_name {
        Some(n) => Some(
            FilterNode::insert(g, n, FilterKind::MirrorTop, &plan.source)
                .map_err(|e| MirrorError::Invalid(e.to_string()))?,
        ),
        None => None,
    };
    // QEMU creates the job, then refuses a negative speed or the target:
    // created, null.
    let refusal = match p.job.speed() {
        Err(e) => Some(e),
        Ok(_) => resolve::target_refusal(g, &plan.target),
    };
    if let Some(e) = refusal {
        mgr.create(spec).map_err(MirrorError::Job)?.abandon();
        return Err(MirrorError::Invalid(e));
    }
    let speed = p.job.speed().unwrap_or(0);
    let spec = JobSpec { speed, ..spec };
    let setup = Setup {
        granularity: plan.granularity,
        buf_size: plan.buf_size,
        chunk: tuning.chunk,
        on_source: plan.on_source,
        on_target: plan.on_target,
        write_blocking: plan.write_blocking,
    };
    let mirror = Mirror::new(
        plan.source.clone(),
        plan.target.clone(),
        plan.devices.clone(),
        &setup,
    );
    let mode = mirror.mode();
    let owner = plan.owner;
    let driver = Filtered::new(MirrorDriver { mirror, plan }, filter);
    let job = job::start(mgr, rt, spec, owner, Some(0), driver).map_err(MirrorError::Job)?;
    job.set_ext(mode);
    Ok(job)
}

/// The mirror's driver.
pub struct MirrorDriver {
    mirror: Mirror,
    plan: MirrorPlan,
}

impl JobDriver for MirrorDriver {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            if self.plan.source.size() != self.plan.target.size() {
                return Err("Source and target image have different sizes".into());
            }
            self.mirror.init(&self.plan.init).await?;
            self.mirror.run(job).await
        })
    }

    fn prepare<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            if job.soft_cancel_requested() || !job.complete_requested() {
                // Cancelled once ready, without force: the last writes
                // copied with the devices quiesced, no pivot.
                return self.mirror.finish_copy(job).await;
            }
            let graph = self.plan.graph.clone();
            let change = graph.change_on_reactor().await;
            let r = match self.mirror.untracked_user(&graph) {
                Some(d) => Err(format!(
                    "'{}' got a new user ('{d}') during the mirror; its writes were not tracked",
                    self.plan.source.name()
                )),
                None => self.mirror.pivot(job).await,
            };
            drop(change);
            r
        })
    }

    fn clean<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        self.mirror.detach();
        Box::pin(async move {
            if self.plan.release_target {
                release(&self.plan.graph, &self.plan.target).await;
            }
        })
    }
}

/// Releases a target the job's request opened, unless something (a device
/// moved onto it) uses it: unregistered, unlinked from its backing, closed.
async fn release(g: &Graph, target: &Arc<dyn bdev::Bdev>) {
    let name = target.name();
    if !g.nodes().contains(name) || !g.nodes().claims(name).is_empty() {
        return;
    }
    let Ok(b) = g.unregister_from_reactor(name).await else {
        return;
    };
    if let Some(img) = graph::node::image(&b) {
        if let Err(e) = img.set_backing_bdev(None).await {
            tracing::warn!(node = name, error = %e, "cannot unlink mirror target");
        }
    }
    g.release_all(&bdev::Holder::Node(name.to_string()));
    if let Some(q) = b.as_any().downcast_ref::<bdev::qcow2::Qcow2Bdev>() {
        if let Err(e) = q.close().await {
            tracing::warn!(node = name, error = %e, "cannot close mirror target");
        }
    }
    b.on_delete();
    if let Some(rt) = reactor::handle() {
        // Every reactor's cached channel goes, and with the last the file.
        let c = b.clone();
        let _ = rt.broadcast(move || bdev::drop_cached_channels(&c)).await;
    }
    tracing::info!(node = name, "mirror target released");
}

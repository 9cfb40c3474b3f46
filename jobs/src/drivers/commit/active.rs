//! The active commit (QEMU's `commit_active_start`: a mirror of the active
//! layer into base) on the mirror core (`drivers/mirror/core.rs`): the
//! source is top, the target base, the dirty map starts with what top..base
//! holds above base and is attached to every device over top before the
//! job starts; `ready` once nothing is dirty, and at `block-job-complete`
//! the devices are quiesced, what is left copied, base made durable and the
//! devices moved onto it; the committed layers nothing uses are released.
//!
//! Progress is QEMU's mirror's: `len` is what was copied plus what is dirty
//! now, so it grows with client writes. Cancel (or an error) before the
//! pivot leaves the chain and the devices as they were; a cancel without
//! `force` once ready completes the job without the pivot (QEMU's).

use super::{release_unused, CommitPlan};
use crate::copy::Tuning;
use crate::drivers::mirror::{Init, Mirror, Setup};
use crate::job::{Job, JobDriver, OnError, Step};
use std::sync::Arc;

/// QEMU's mirror buffer (`DEFAULT_MIRROR_BUF_SIZE`).
const BUF_SIZE: u64 = 16 << 20;

/// The active commit's driver.
pub struct ActiveCommit {
    plan: CommitPlan,
    mirror: Mirror,
}

impl ActiveCommit {
    /// Attaches a dirty map to every device over top at once (on the
    /// caller's thread), so no write after the command is missed.
    pub fn new(plan: CommitPlan, tuning: Tuning, on_error: OnError) -> Self {
        let setup = Setup {
            granularity: plan.top.cluster_size().max(64 << 10),
            buf_size: BUF_SIZE,
            chunk: tuning.chunk,
            on_source: on_error,
            on_target: on_error,
            write_blocking: false,
        };
        let mirror = Mirror::new(
            plan.top_bdev.clone(),
            plan.base.clone(),
            plan.roots_of.clone(),
            &setup,
        );
        Self { plan, mirror }
    }
}

impl JobDriver for ActiveCommit {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            let base = Some(self.plan.base.clone());
            self.mirror.init(&Init::Above(base)).await?;
            self.mirror.run(job).await
        })
    }

    fn prepare<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            if job.soft_cancel_requested() {
                // Cancelled once ready, without force: base gets the last
                // writes (devices quiesced), no pivot.
                return self.mirror.finish_copy(job).await;
            }
            let graph = self.plan.graph.clone();
            let change = graph.change_on_reactor().await;
            let r = self.pivot(job).await;
            drop(change);
            r
        })
    }

    fn clean<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        self.mirror.detach();
        self.plan.writers.clear();
        Box::pin(async {})
    }
}

impl ActiveCommit {
    /// The mirror's pivot onto base (which keeps its writer's lock), then
    /// the committed layers nothing uses released.
    async fn pivot(&mut self, job: &Job) -> Result<(), String> {
        // A front door opened on top during the job (an export added) had
        // its writes untracked: no pivot rather than a base that lacks them.
        if let Some(d) = self.mirror.untracked_user(&self.plan.graph) {
            return Err(format!(
                "'{}' got a new user ('{d}') during the commit; its writes were not tracked",
                self.plan.top_bdev.name()
            ));
        }
        self.mirror.pivot(job).await?;
        if !self.plan.writers.is_empty() {
            // Base is now the devices' active layer: it stays a writer.
            self.plan.writers.remove(0).keep();
        }
        release_unused(&self.plan).await;
        Ok(())
    }
}

//! The active commit (QEMU's `commit_active_start`: a mirror of the active
//! layer into base): copy what top..base holds, keep copying what clients
//! write (a [`DirtyMap`] on every device over top, attached before the job
//! starts), `ready` once nothing is dirty, and at `block-job-complete`
//! quiesce the devices, copy what is left and move them onto base.
//!
//! Progress is QEMU's mirror's: `len` is what was copied plus what is dirty
//! now, so it grows with client writes. Cancel (or an error) before the
//! pivot leaves the chain and the devices as they were; a cancel without
//! `force` once ready completes the job without the pivot (QEMU's).

use super::{flush, release_unused, CommitPlan};
use crate::copy::{strerror, Tuning};
use crate::job::{IoOperation, Job, JobDriver, Step, Verdict};
use bdev::device::{Device, DirtyMap, WriteTracking};
use bdev::{submit_wait, BdevIo, DmaBuf, IoChannel};
use graph::node::same as bdev_same;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// How long the job sleeps when nothing is dirty before looking again.
const IDLE: Duration = Duration::from_millis(2);

/// The active commit's driver.
pub struct ActiveCommit {
    plan: CommitPlan,
    tuning: Tuning,
    map: Arc<DirtyMap>,
    tracking: Vec<WriteTracking>,
}

impl ActiveCommit {
    /// Attaches a dirty map to every device over top at once (on the
    /// caller's thread), so no write after the command is missed.
    pub fn new(plan: CommitPlan, tuning: Tuning) -> Self {
        let gran = plan.top.cluster_size().max(64 << 10);
        let map = Arc::new(DirtyMap::new(plan.top_bdev.size(), gran));
        let tracking = plan
            .roots_of
            .iter()
            .filter_map(Device::from_bdev)
            .map(|d| d.track_writes(map.clone()))
            .collect();
        Self {
            plan,
            tuning,
            map,
            tracking,
        }
    }
}

/// The two channels a copy uses.
struct Io {
    top: Rc<IoChannel>,
    base: Rc<IoChannel>,
}

impl Io {
    fn new(plan: &CommitPlan) -> Result<Io, String> {
        Ok(Io {
            top: bdev::channel(&plan.top_bdev).map_err(|e| e.to_string())?,
            base: bdev::channel(&plan.base).map_err(|e| e.to_string())?,
        })
    }

    /// Reads `[offset, offset+len)` through top, writes it into base.
    async fn copy(&self, offset: u64, len: u64) -> Result<(), (IoOperation, i32)> {
        let buf = DmaBuf::new(len as usize).map_err(|_| (IoOperation::Read, libc::ENOMEM))?;
        let mut io = submit_wait(&self.top, BdevIo::read(offset, buf, None)).await;
        if !io.status.is_ok() {
            return Err((IoOperation::Read, io.status.errno()));
        }
        let buf = io.take_buf().ok_or((IoOperation::Read, libc::EIO))?;
        let io = submit_wait(&self.base, BdevIo::write(offset, buf, None)).await;
        if !io.status.is_ok() {
            return Err((IoOperation::Write, io.status.errno()));
        }
        Ok(())
    }
}

impl ActiveCommit {
    /// Marks what the committed layers hold above base (QEMU's
    /// `mirror_dirty_init`).
    async fn mark_allocated(&self) -> Result<(), String> {
        let size = self.plan.top_bdev.size();
        let mut off = 0;
        while off < size {
            let s = self
                .plan
                .top
                .block_status(off, size - off, Some(&self.plan.base))
                .await
                .map_err(|e| strerror(e.errno()))?;
            if s.allocated_above_base {
                self.map.mark(off, s.len);
            }
            off += s.len.max(1);
        }
        Ok(())
    }

    fn account(&self, job: &Job, done: u64) {
        job.add_progress(done);
        let (offset, _) = job.progress();
        job.set_len(offset + self.map.dirty_bytes());
    }

    /// Copies one dirty run, applying the job's error policy: `Ok(false)`
    /// when the run failed and was marked again (ignore, stop).
    async fn step(&self, job: &Job, io: &Io, off: u64, len: u64) -> Result<bool, String> {
        if let Some(ns) = job.rate_delay(len) {
            reactor::sleep(Duration::from_nanos(ns)).await;
        }
        match io.copy(off, len).await {
            Ok(()) => {
                self.account(job, len);
                Ok(true)
            }
            Err((op, errno)) => {
                self.map.mark(off, len);
                match job.io_error(op, errno) {
                    Verdict::Report => Err(strerror(errno)),
                    _ => Ok(false),
                }
            }
        }
    }
}

impl JobDriver for ActiveCommit {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            self.mark_allocated().await?;
            job.set_len(self.map.dirty_bytes());
            let io = Io::new(&self.plan)?;
            let mut cursor = 0;
            let mut ready = false;
            loop {
                if !job.pause_point().await || job.soft_cancel_requested() {
                    return Ok(());
                }
                match self.map.take(cursor, self.tuning.chunk) {
                    Some((off, len)) => {
                        cursor = off + len;
                        if !self.step(job, &io, off, len).await? {
                            // Ignored or stopped: try again after a pause point.
                            reactor::sleep(IDLE).await;
                        }
                    }
                    None if !ready => {
                        ready = true;
                        job.set_ready();
                    }
                    None if job.complete_requested() => return Ok(()),
                    None => reactor::sleep(IDLE).await,
                }
            }
        })
    }

    fn prepare<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            if job.soft_cancel_requested() {
                // Cancelled once ready, without force: done, no pivot.
                return Ok(());
            }
            let graph = self.plan.graph.clone();
            let change = graph.change_on_reactor().await;
            let r = self.pivot(job).await;
            drop(change);
            r
        })
    }

    fn clean<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        self.tracking.clear();
        self.plan.writers.clear();
        Box::pin(async {})
    }
}

impl ActiveCommit {
    /// Devices quiesced, what is still dirty copied, base made durable, the
    /// devices moved onto base (which keeps its writer's lock), then the
    /// committed layers nothing uses released.
    async fn pivot(&mut self, job: &Job) -> Result<(), String> {
        let rt = reactor::handle().ok_or_else(|| "not on a reactor".to_string())?;
        // A front door opened on top during the job (an export added) had
        // its writes untracked: no pivot rather than a base that lacks them.
        let g = &self.plan.graph;
        let top = self.plan.top_bdev.name();
        let mut now = Device::hidden_by_root(g.nodes(), top);
        now.extend(Device::find_by_root(g.nodes(), top));
        if let Some(d) = now
            .iter()
            .find(|d| !self.plan.roots_of.iter().any(|t| bdev_same(t, d)))
        {
            return Err(format!(
                "'{}' got a new user ('{}') during the commit; its writes were not tracked",
                top,
                d.name()
            ));
        }
        let devs: Vec<&Device> = self
            .plan
            .roots_of
            .iter()
            .filter_map(Device::from_bdev)
            .collect();
        let mut quiesced = 0;
        let mut r = Ok(());
        for d in &devs {
            if let Err(e) = d.quiesce(&rt).await {
                r = Err(e.to_string());
                break;
            }
            quiesced += 1;
        }
        if r.is_ok() {
            r = self.drain_and_switch(job, &rt, &devs).await;
        }
        for d in &devs[..quiesced] {
            d.resume(&rt).await;
        }
        r?;
        self.tracking.clear();
        if !self.plan.writers.is_empty() {
            // Base is now the devices' active layer: it stays a writer.
            self.plan.writers.remove(0).keep();
        }
        release_unused(&self.plan).await;
        Ok(())
    }

    async fn drain_and_switch(
        &self,
        job: &Job,
        rt: &reactor::RuntimeHandle,
        devs: &[&Device],
    ) -> Result<(), String> {
        let io = Io::new(&self.plan)?;
        while let Some((off, len)) = self.map.take(0, self.tuning.chunk) {
            io.copy(off, len).await.map_err(|(_, e)| {
                self.map.mark(off, len);
                strerror(e)
            })?;
            self.account(job, len);
        }
        flush(&self.plan.base).await?;
        for d in devs {
            d.swap_root(rt, self.plan.base.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

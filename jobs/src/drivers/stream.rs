//! The stream driver: copy into the top image what its backing chain above
//! `base` holds, then drop the backing file (or point it at `base`).
//!
//! [`start`] resolves and validates the request as QEMU's `qmp_block_stream`
//! does (`resolve.rs`), raises the top's lock for writing, and starts the job
//! on the reactor that owns the top image's metadata. The driver's `run` is
//! the shared pipelined copier over [`StreamOps`] (walk: what the chain above
//! base has and the top lacks; copy: one read through the chain, one
//! "populate if still unallocated"); `prepare` is the final graph change
//! (`finish.rs`); `clean` lowers the lock again.

mod finish;
mod resolve;

pub(crate) use resolve::matches_file;
pub use resolve::{resolve, StreamError, StreamParams, StreamPlan};

use crate::copy::{self, BufPool, Chunk, CopyError, CopyOps, Extent, Tuning};
use crate::job::filter::{FilterNode, Filtered};
use crate::job::{self, IoOperation, Job, JobDriver, JobKind, JobManager, Step};
use bdev::device::{ClientWatch, Device};
use bdev::filter::FilterKind;
use bdev::{Bdev, BdevError, IoChannel};
use graph::node::ImageNode;
use reactor::RuntimeHandle;
use std::rc::Rc;
use std::sync::Arc;

/// The job type.
pub const KIND: JobKind = JobKind {
    name: "stream",
    block_job: true,
};

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
    // `stream_start` reopens it read-write, taking a writer's lock (a guard:
    // lowered again when the driver drops it in `clean`, or at once if the
    // job cannot start).
    let writer = graph::lock::WriterLock::raise(&plan.top_bdev)
        .map_err(|e| StreamError::Invalid(e.to_string()))?;
    plan.writer = Some(Arc::new(writer));
    let owner = plan.owner;
    // QEMU's job sets its length on its first run, inside the command.
    let len = (!plan.noop).then(|| plan.top_bdev.size());
    let filter = match &p.job.filter_node_name {
        Some(n) => Some(
            FilterNode::insert(g, n, FilterKind::CopyOnRead, &plan.top_bdev)
                .map_err(|e| StreamError::Invalid(format!("Could not create node: {e}")))?,
        ),
        None => None,
    };
    let driver = Filtered::new(StreamDriver { plan, tuning }, filter);
    job::start(mgr, rt, spec, owner, len, driver).map_err(StreamError::Job)
}

/// The stream job's driver.
pub struct StreamDriver {
    plan: StreamPlan,
    tuning: Tuning,
}

impl StreamDriver {
    /// A driver for a resolved plan.
    pub fn new(plan: StreamPlan, tuning: Tuning) -> Self {
        Self { plan, tuning }
    }
}

impl JobDriver for StreamDriver {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            if self.plan.noop || self.plan.top.is_none() {
                return Ok(());
            }
            let ops = StreamOps::new(&self.plan, &self.tuning).map_err(|e| e.to_string())?;
            copy::copy_all(job, Rc::new(ops), &self.tuning).await
        })
    }

    fn prepare<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            // The final backing change is a graph change: serialised with
            // every other (waited for without blocking the reactor).
            let change = self.plan.graph.change_on_reactor().await;
            let r = finish::change_backing(&self.plan).await;
            drop(change);
            r
        })
    }

    fn clean<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        // A top that is a backing file gets its reader's lock back before the
        // job concludes (QEMU's stream_clean reopens it read-only): the
        // guard is dropped.
        drop(self.plan.writer.take());
        Box::pin(async {})
    }
}

/// What a stream copies and how: the walk of the top's chain above base and
/// the copy of one chunk into the top.
pub struct StreamOps {
    top: Arc<dyn ImageNode>,
    size: u64,
    base: Option<Arc<dyn Bdev>>,
    ch: Rc<IoChannel>,
    pool: BufPool,
    /// A durable job flushes at its end: writeback may start at once.
    write_behind: bool,
    watch: Option<ClientWatch>,
}

impl StreamOps {
    /// The copy of `plan` (on the top's owner reactor).
    pub fn new(plan: &StreamPlan, t: &Tuning) -> Result<Self, BdevError> {
        let top = plan.top.clone().ok_or_else(|| {
            BdevError::Unsupported(format!("'{}' has no backing chain", plan.top_bdev.name()))
        })?;
        let ch = bdev::channel(&plan.top_bdev)?;
        let watch = plan
            .device
            .as_ref()
            .and_then(Device::from_bdev)
            .map(|d| d.watch_clients());
        Ok(Self {
            size: plan.top_bdev.size(),
            top,
            base: plan.base.clone(),
            ch,
            pool: BufPool::new(t.max_inflight.max(1)),
            write_behind: plan.durable,
            watch,
        })
    }

    /// Copies `c` from the chain of the top into the top: one read through
    /// the chain into one buffer, then one multi-cluster populate (clusters a
    /// client wrote meanwhile are left alone). Zero chunks become zero
    /// clusters when the image has them, else zero data.
    async fn copy_chunk(&self, c: Chunk) -> Result<(), CopyError> {
        let write_err = |e: &BdevError| CopyError {
            op: IoOperation::Write,
            errno: e.errno(),
        };
        if c.zero {
            match self.top.populate_zero_if_unallocated(c.offset, c.len).await {
                Ok(_) => return Ok(()),
                Err(BdevError::Unsupported(_)) => {}
                Err(e) => return Err(write_err(&e)),
            }
        }
        let buf = copy::read_chunk(&self.pool, &self.ch, &c).await?;
        let (buf, _) = self
            .top
            .populate_range_if_unallocated(c.offset, buf, self.write_behind)
            .await
            .map_err(|e| write_err(&e))?;
        self.pool.give(buf);
        Ok(())
    }
}

impl CopyOps for StreamOps {
    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.top.cluster_size().max(512)
    }

    async fn extent(&self, offset: u64, len: u64) -> Result<Extent, i32> {
        let s = self
            .top
            .block_status(offset, len, self.base.as_ref())
            .await
            .map_err(|e| e.errno())?;
        Ok(Extent {
            len: s.len,
            copy: !s.allocated_here && s.allocated_above_base && !(s.zero && self.base.is_none()),
            zero: s.zero,
        })
    }

    async fn copy(&self, c: Chunk) -> Result<(), CopyError> {
        self.copy_chunk(c).await
    }

    fn client_ops(&self) -> Option<u64> {
        self.watch.as_ref().map(|w| w.activity().ops)
    }

    async fn settle(&self) {
        copy::settle_flush(&self.ch).await
    }
}

//! The commit driver (QEMU's `block-commit`, `block/commit.c`): copy into
//! `base` what the layers from `top` down to `base` (excluded) hold, then
//! drop those layers from the chain.
//!
//! [`resolve`] (`resolve.rs`) checks a request as QEMU's `qmp_block_commit`
//! does, in its order and words (device, top, base, blockers, "into
//! itself", the active layer). [`start`] reopens a read-only `base` (libvirt
//! adds the lower layers read-only) read-write for the job, as QEMU's
//! `commit_start` / `commit_active_start` do ([`graph::reopen::ReadWrite`];
//! a file that cannot be written refuses the command in QEMU's words,
//! "Could not open '<path>': ..."), raises the writer's lock of `base` and of
//! the image above `top` (its header changes), and starts the job on the
//! reactor owning the top's metadata. `clean` lowers the locks, then reopens
//! `base` read-only again, unless an active commit moved the devices onto it
//! (QEMU's mirror makes the new active layer writable). A read-only image
//! above `top` is reopened read-write only while its header is rewritten
//! (QEMU shows it read-only throughout).
//!
//! - **Intermediate commit** (top is below the device's active layer):
//!   `run` is the shared copier over [`CommitOps`] (walk: what `top..base`
//!   holds above base; copy: one read through the top, one write into base);
//!   `prepare` flushes base, writes base's name into the header of the image
//!   above top (`backing-file` overrides it), relinks it (and any other image
//!   over top) in memory with the device quiesced, and releases the layers
//!   nothing else uses; the job completes on its own.
//! - **Active commit** (top is the active layer, `active.rs`): QEMU's
//!   mirror of the active layer into base, on the mirror core. Every device over top marks what
//!   clients write in a dirty map from the start; the job copies what the
//!   committed layers hold, then whatever is dirty, becomes ready when
//!   nothing is, keeps copying new writes, and at `block-job-complete`
//!   quiesces the devices, copies what is left and switches them onto base.
//!
//! A cancel before completion leaves the chain as it was: base only
//! received data its overlays shadow.

mod active;
mod resolve;

pub use resolve::{resolve, CommitError, CommitParams, CommitPlan};

use crate::copy::{self, BufPool, Chunk, CopyError, CopyOps, Extent, Tuning};
use crate::job::filter::{FilterNode, Filtered};
use crate::job::{self, IoOperation, Job, JobDriver, JobKind, JobManager, Step};
use bdev::device::{ClientWatch, Device};
use bdev::filter::FilterKind;
use bdev::{submit_wait, Bdev, BdevError, BdevIo, IoChannel, IoType};
use graph::lock::WriterLock;
use graph::node::{self, ImageNode};
use graph::reopen::{ReadWrite, ReopenError};
use graph::Graph;
use reactor::RuntimeHandle;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// The job type.
pub const KIND: JobKind = JobKind {
    name: "commit",
    block_job: true,
};

/// Validates `p`, creates the job and starts it. Returns at once.
pub fn start(
    g: &Arc<Graph>,
    mgr: &JobManager,
    rt: &RuntimeHandle,
    p: CommitParams,
    tuning: Tuning,
) -> Result<Arc<Job>, CommitError> {
    let (mut plan, spec) = resolve(g, mgr, &p)?;
    let owner = plan.owner;
    // QEMU's filter over top: an active commit's mirror_top comes before
    // the job (a bad name: no job), an intermediate one's commit_top after
    // it (a bad name: the job is created and ends at once).
    let filter = match &p.job.filter_node_name {
        Some(n) => {
            let kind = if plan.overlay.is_none() {
                FilterKind::MirrorTop
            } else {
                FilterKind::CommitTop
            };
            match FilterNode::insert(g, n, kind, &plan.top_bdev) {
                Ok(f) => Some(f),
                Err(e) => {
                    if plan.overlay.is_some() {
                        mgr.create(spec).map_err(CommitError::Job)?.abandon();
                    }
                    return Err(CommitError::Invalid(e.to_string()));
                }
            }
        }
        None => None,
    };
    // A read-only base (libvirt adds the lower layers so) is reopened
    // read-write for the job and read-only again in `clean`, as QEMU's
    // commit_start / commit_active_start do; an active commit's base stays
    // writable once the devices moved onto it.
    let base_rw = ReadWrite::reopen_blocking(rt, owner, &plan.base)
        .map_err(|e| reopen_error(&plan.base, e))?;
    let give_back = |rw: ReadWrite| {
        let _ = rt.spawn_on(owner, move || rw.restore()).block();
    };
    // Base is written, the overlay's header too: writers' locks for the
    // job's life (guards: lowered in `clean`, or at once if it cannot start).
    let mut locked = vec![plan.base.clone()];
    locked.extend(plan.overlay.as_ref().map(|o| o.bdev()));
    for b in locked {
        match WriterLock::raise(&b) {
            Ok(w) => plan.writers.push(w),
            Err(e) => {
                plan.writers.clear();
                give_back(base_rw);
                return Err(CommitError::Invalid(e.to_string()));
            }
        }
    }
    // The reopen is the driver's to undo in `clean`; should the job not
    // start, it is taken back here and undone at once.
    let slot: BaseSlot = Arc::new(Mutex::new(Some(base_rw)));
    let r = if plan.overlay.is_none() {
        // QEMU's mirror counts what is left to copy, found once it runs.
        let driver = Reopened {
            base: plan.base.clone(),
            roots: plan.roots_of.clone(),
            inner: active::ActiveCommit::new(plan, tuning, spec.on_error),
            rw: slot.clone(),
        };
        job::start(mgr, rt, spec, owner, Some(0), Filtered::new(driver, filter))
    } else {
        let len = Some(plan.top_bdev.size());
        let driver = CommitDriver {
            plan,
            tuning,
            base_rw: slot.clone(),
        };
        job::start(mgr, rt, spec, owner, len, Filtered::new(driver, filter))
    };
    r.map_err(|e| {
        if let Some(rw) = take(&slot) {
            give_back(rw);
        }
        CommitError::Job(e)
    })
}

/// A failed reopen in QEMU's words (commit_start's `bdrv_reopen_set_read_only`).
fn reopen_error(node: &Arc<dyn Bdev>, e: ReopenError) -> CommitError {
    match e {
        ReopenError::Unsupported => CommitError::ReadOnly(node.name().to_string()),
        e => CommitError::Invalid(e.to_string()),
    }
}

/// The base's read-write reopen, shared by the driver (which undoes it in
/// `clean`) and `start` (which undoes it if the job does not start).
type BaseSlot = Arc<Mutex<Option<ReadWrite>>>;

fn take(slot: &BaseSlot) -> Option<ReadWrite> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The active commit with the base's reopen around it: once the inner
/// driver cleaned up, base goes back to read-only unless the devices moved
/// onto it (QEMU's `mirror_exit_common` reopens the target as the node it
/// replaced; `commit_active_start`'s error path and an abort, read-only).
struct Reopened<D> {
    inner: D,
    base: Arc<dyn Bdev>,
    roots: Vec<Arc<dyn Bdev>>,
    rw: BaseSlot,
}

impl<D: JobDriver> JobDriver for Reopened<D> {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        self.inner.run(job)
    }

    fn prepare<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        self.inner.prepare(job)
    }

    fn commit<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        self.inner.commit(job)
    }

    fn abort<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        self.inner.abort(job)
    }

    fn clean<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        Box::pin(async move {
            self.inner.clean(job).await;
            let Some(rw) = take(&self.rw) else {
                return;
            };
            let pivoted = self
                .roots
                .iter()
                .filter_map(Device::from_bdev)
                .any(|d| node::same(&d.root(), &self.base));
            if pivoted {
                rw.keep();
            } else {
                rw.restore().await;
            }
        })
    }
}

/// The intermediate commit's driver.
pub struct CommitDriver {
    plan: CommitPlan,
    tuning: Tuning,
    /// Base reopened read-write for the job (given back read-only in `clean`).
    base_rw: BaseSlot,
}

impl JobDriver for CommitDriver {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            let ops = CommitOps::new(&self.plan, &self.tuning).map_err(|e| e.to_string())?;
            copy::copy_all(job, Rc::new(ops), &self.tuning).await
        })
    }

    fn prepare<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        Box::pin(async move {
            let change = self.plan.graph.change_on_reactor().await;
            let r = drop_layers(&self.plan).await;
            drop(change);
            r
        })
    }

    fn clean<'a>(&'a mut self, _job: &'a Arc<Job>) -> Step<'a, ()> {
        // The writer's lock lowered first, then base reopened read-only.
        self.plan.writers.clear();
        let rw = take(&self.base_rw);
        Box::pin(async move {
            if let Some(rw) = rw {
                rw.restore().await;
            }
        })
    }
}

async fn flush(b: &Arc<dyn Bdev>) -> Result<(), String> {
    let ch = bdev::channel(b).map_err(|e| e.to_string())?;
    let io = submit_wait(&ch, BdevIo::new(IoType::Flush, 0, 0, None, None)).await;
    if io.status.is_ok() {
        Ok(())
    } else {
        Err(copy::strerror(io.status.errno()))
    }
}

/// QEMU's `bdrv_drop_intermediate`: base made durable, its name in the
/// overlay's header, the overlay relinked onto it (device quiesced), every
/// other image over top likewise, then the committed layers nothing else
/// uses released, top first.
async fn drop_layers(plan: &CommitPlan) -> Result<(), String> {
    let Some(overlay) = plan.overlay.as_ref() else {
        return Err("an active commit has no overlay to relink".into());
    };
    flush(&plan.base).await?;
    let rt = reactor::handle().ok_or_else(|| "not on a reactor".to_string())?;
    let dev = plan.device.as_ref().and_then(Device::from_bdev);
    if let Some(d) = dev {
        d.quiesce(&rt).await.map_err(|e| e.to_string())?;
    }
    // A read-only overlay (a layer libvirt added read-only above top) is
    // writable just for its header, as QEMU's bdrv_drop_intermediate
    // rewrites it: it reads read-only before and after.
    let r = match ReadWrite::reopen(&overlay.bdev()).await {
        Ok(rw) => {
            let r = async {
                let w = WriterLock::raise(&overlay.bdev())?;
                overlay
                    .set_backing_file(Some(&plan.backing_file), Some(&plan.backing_format), true)
                    .await?;
                drop(w);
                overlay.set_backing_bdev(Some(plan.base.clone())).await
            }
            .await
            .map_err(|e| e.to_string());
            rw.restore().await;
            r
        }
        Err(e) => Err(e.to_string()),
    };
    if let Some(d) = dev {
        d.resume(&rt).await;
    }
    r?;
    let g = &plan.graph;
    // Every other image over top (a layer dropped from the chain earlier and
    // kept by the monitor) moves onto base too, as QEMU's replace of top by
    // base does for all of top's parents.
    for other in g.nodes().list() {
        let Some(img) = node::image(&other) else {
            continue;
        };
        let over_top = img
            .backing()
            .is_some_and(|b| node::same(&b, &plan.top_bdev));
        if !over_top || node::same(&other, &overlay.bdev()) {
            continue;
        }
        let rw = ReadWrite::reopen(&other).await.map_err(|e| e.to_string())?;
        let r = async {
            let writer = WriterLock::raise(&other)?;
            img.set_backing_file(Some(&plan.backing_file), Some(&plan.backing_format), true)
                .await?;
            drop(writer);
            img.set_backing_bdev(Some(plan.base.clone())).await
        }
        .await;
        rw.restore().await;
        r.map_err(|e| e.to_string())?;
    }
    release_unused(plan).await;
    Ok(())
}

/// Releases the committed layers nothing claims any more (top first), each
/// letting go of what is below it.
async fn release_unused(plan: &CommitPlan) {
    let g = &plan.graph;
    for b in &plan.intermediates {
        let name = b.name();
        if !g.nodes().contains(name) || !g.nodes().claims(name).is_empty() {
            continue;
        }
        if let Ok(b) = g.unregister_from_reactor(name).await {
            if let Some(img) = node::image(&b) {
                if let Err(e) = img.set_backing_bdev(None).await {
                    tracing::warn!(node = name, error = %e, "cannot unlink committed image");
                }
            }
            if let Some(q) = b.as_any().downcast_ref::<bdev::qcow2::Qcow2Bdev>() {
                if let Err(e) = q.close().await {
                    tracing::warn!(node = name, error = %e, "cannot close committed image");
                }
            }
            b.on_delete();
            tracing::info!(node = name, "committed image released");
        }
    }
}

/// What a commit copies and how: the walk of `top..base` and the copy of
/// one chunk into base.
pub struct CommitOps {
    top: Arc<dyn ImageNode>,
    base: Arc<dyn Bdev>,
    size: u64,
    granularity: u64,
    top_ch: Rc<IoChannel>,
    base_ch: Rc<IoChannel>,
    pool: BufPool,
    watch: Option<ClientWatch>,
}

impl CommitOps {
    /// The copy of `plan` (on the top's owner reactor).
    pub fn new(plan: &CommitPlan, t: &Tuning) -> Result<Self, BdevError> {
        let base_cluster = node::image(&plan.base).map_or(512, |i| i.cluster_size());
        Ok(Self {
            top: plan.top.clone(),
            base: plan.base.clone(),
            size: plan.top_bdev.size(),
            granularity: plan.top.cluster_size().max(base_cluster).max(512),
            top_ch: bdev::channel(&plan.top_bdev)?,
            base_ch: bdev::channel(&plan.base)?,
            pool: BufPool::new(t.max_inflight.max(1)),
            watch: plan
                .device
                .as_ref()
                .and_then(Device::from_bdev)
                .map(|d| d.watch_clients()),
        })
    }

    /// One read through the top (what the chain shows there, which above
    /// base is the committed layers' data), one write into base.
    async fn copy_chunk(&self, c: Chunk) -> Result<(), CopyError> {
        let buf = copy::read_chunk(&self.pool, &self.top_ch, &c).await?;
        let mut io = submit_wait(&self.base_ch, BdevIo::write(c.offset, buf, None)).await;
        let st = io.status;
        if let Some(b) = io.take_buf() {
            self.pool.give(b);
        }
        if st.is_ok() {
            Ok(())
        } else {
            Err(CopyError {
                op: IoOperation::Write,
                errno: st.errno(),
            })
        }
    }
}

impl CopyOps for CommitOps {
    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.granularity
    }

    async fn extent(&self, offset: u64, len: u64) -> Result<Extent, i32> {
        let s = self
            .top
            .block_status(offset, len, Some(&self.base))
            .await
            .map_err(|e| e.errno())?;
        Ok(Extent {
            len: s.len,
            copy: s.allocated_above_base,
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
        copy::settle_flush(&self.base_ch).await
    }
}

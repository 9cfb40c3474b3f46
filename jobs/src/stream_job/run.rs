//! The stream job's task on the top image's owner reactor: walk the image,
//! skip what the top has, copy what the chain above base has with many chunks
//! in flight (fewer while clients are busy), honour pause, cancel, speed and
//! the error policy, then change the backing file.

use super::copy::{copy_chunk, BufPool, Chunk, CopyError};
use super::resolve::StreamPlan;
use crate::job::{IoOperation, Job, Verdict};
use bdev::device::Device;
use graph::node;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// How the job copies. The defaults come from `scripts/bench/stream.sh`.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Largest chunk (rounded to whole clusters).
    pub chunk: u64,
    /// Chunks in flight while clients are idle.
    pub max_inflight: usize,
    /// Lower the in-flight count while clients use the device.
    pub yield_to_clients: bool,
    /// How often client activity is sampled.
    pub sample: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            chunk: 2 << 20,
            max_inflight: 8,
            yield_to_clients: true,
            sample: Duration::from_millis(5),
        }
    }
}

/// The C library's text for an errno (what QEMU puts in `error`).
pub(crate) fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno.abs()).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[derive(Default)]
struct Shared {
    inflight: usize,
    queue: VecDeque<Chunk>,
    error: Option<String>,
    report: bool,
}

impl Shared {
    fn note_error(&mut self, errno: i32) {
        if self.error.is_none() {
            self.error = Some(strerror(errno));
        }
    }
}

/// Applies the error policy to a failed chunk.
fn on_failure(job: &Job, st: &RefCell<Shared>, c: Chunk, e: CopyError) {
    match job.io_error(e.op, e.errno) {
        Verdict::Report => {
            let mut s = st.borrow_mut();
            s.note_error(e.errno);
            s.report = true;
        }
        Verdict::Ignore => {
            st.borrow_mut().note_error(e.errno);
            job.add_progress(c.progress);
        }
        Verdict::Stop => st.borrow_mut().queue.push_back(c),
    }
}

/// Adapts the in-flight count (and with it the chunk size) to client activity (AIMD).
struct Yield {
    watch: Option<bdev::device::ClientWatch>,
    last_ops: u64,
    last_tick: u64,
    period: u64,
    window: usize,
    max: usize,
}

impl Yield {
    fn window(&mut self) -> usize {
        let Some(w) = &self.watch else {
            return self.max;
        };
        let now = reactor::ticks();
        if now.saturating_sub(self.last_tick) >= self.period {
            let ops = w.activity().ops;
            if ops != self.last_ops {
                self.window = (self.window / 2).max(1);
            } else {
                self.window = (self.window + 1).min(self.max);
            }
            self.last_ops = ops;
            self.last_tick = now;
        }
        self.window
    }
}

async fn wait_kick_or(job: &Job, d: Duration) {
    let sleep = Box::pin(reactor::sleep(d));
    let kick = Box::pin(job.wait_kick());
    let _ = futures::future::select(sleep, kick).await;
}

/// Copies everything the chain above base holds and the top lacks. Returns the
/// job's error, if any (the caller completes the job).
async fn copy_all(job: &Arc<Job>, plan: &StreamPlan, t: &Tuning) -> Option<String> {
    let top = plan.top.clone()?;
    let ch = match bdev::channel(&plan.top_bdev) {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    let size = plan.top_bdev.size();
    let cs = top.cluster_size().max(512);
    let chunk_max = (t.chunk.max(cs) / cs) * cs;
    let st = Rc::new(RefCell::new(Shared::default()));
    let pool = Rc::new(BufPool::default());
    let keep = t.max_inflight.max(1);
    // A durable job flushes at its end: writeback may start at once.
    let write_behind = plan.durable;
    let watch = plan
        .device
        .as_ref()
        .and_then(Device::from_bdev)
        .filter(|_| t.yield_to_clients)
        .map(|d| d.watch_clients());
    let period = (reactor::ticks_hz() as u128 * t.sample.as_nanos() / 1_000_000_000) as u64;
    let mut yld = Yield {
        last_ops: watch.as_ref().map(|w| w.activity().ops).unwrap_or(0),
        watch,
        last_tick: reactor::ticks(),
        period,
        window: t.max_inflight.max(1),
        max: t.max_inflight.max(1),
    };
    let mut cursor = 0u64;
    // The extent being copied: [cursor, end), and whether it reads as zeroes.
    let mut extent: Option<(u64, bool)> = None;
    loop {
        let (inflight, report) = {
            let s = st.borrow();
            (s.inflight, s.report)
        };
        if job.is_cancelled() || report || job.pause_requested() {
            if inflight > 0 {
                job.wait_kick().await;
                continue;
            }
            if report || !job.pause_point().await {
                break;
            }
            continue;
        }
        let queued = st.borrow_mut().queue.pop_front();
        let c = if let Some(c) = queued {
            c
        } else if cursor < size {
            let (ext_end, zero) = match extent {
                Some(e) => e,
                None => match top
                    .block_status(cursor, size - cursor, plan.base.as_ref())
                    .await
                {
                    Ok(s) => {
                        let copy = !s.allocated_here
                            && s.allocated_above_base
                            && !(s.zero && plan.base.is_none());
                        if !copy {
                            job.add_progress(s.len);
                            cursor += s.len;
                            continue;
                        }
                        (cursor + s.len, s.zero)
                    }
                    Err(e) => {
                        let errno = match &e {
                            bdev::BdevError::Io(s) => s.errno(),
                            other => other.errno(),
                        };
                        // The range is unknown: fail, skip or retry one cluster.
                        let n = (cs - cursor % cs).min(size - cursor);
                        let c = Chunk {
                            offset: cursor,
                            len: n,
                            zero: false,
                            progress: n,
                        };
                        on_failure(
                            job,
                            &st,
                            c,
                            CopyError {
                                op: IoOperation::Read,
                                errno,
                            },
                        );
                        let mut s = st.borrow_mut();
                        if s.queue.back() == Some(&c) {
                            s.queue.pop_back();
                        } else if !s.report {
                            cursor += n;
                        }
                        continue;
                    }
                },
            };
            let start = cursor / cs * cs;
            // While clients are busy, chunks shrink with the window (down to one
            // cluster), so no client request waits behind a large copy.
            let chunk = (chunk_max * yld.window() as u64 / yld.max as u64 / cs).max(1) * cs;
            let end = (start + chunk).min(ext_end.next_multiple_of(cs)).min(size);
            let c = Chunk {
                offset: start,
                len: end - start,
                zero: zero && start == cursor && end <= ext_end,
                progress: end - cursor,
            };
            cursor = end;
            extent = if end < ext_end {
                Some((ext_end, zero))
            } else {
                None
            };
            c
        } else if inflight == 0 {
            // Done, once the rate limit's debt is paid: a limited job lasts
            // at least bytes/speed, as QEMU's does.
            match job.rate_delay(0) {
                None => break,
                Some(ns) => {
                    wait_kick_or(job, Duration::from_nanos(ns).min(Duration::from_millis(50)))
                        .await;
                    continue;
                }
            }
        } else {
            job.wait_kick().await;
            continue;
        };
        if inflight >= yld.window() {
            st.borrow_mut().queue.push_front(c);
            wait_kick_or(job, t.sample).await;
            continue;
        }
        if let Some(ns) = job.rate_delay(c.len) {
            st.borrow_mut().queue.push_front(c);
            wait_kick_or(job, Duration::from_nanos(ns).min(Duration::from_millis(50))).await;
            continue;
        }
        st.borrow_mut().inflight += 1;
        let (job2, st2, top2, ch2) = (job.clone(), st.clone(), top.clone(), ch.clone());
        let pool2 = pool.clone();
        reactor::spawn_local(async move {
            let r = copy_chunk(&top2, &ch2, &pool2, keep, c, write_behind).await;
            match r {
                Ok(()) => job2.add_progress(c.progress),
                Err(e) => on_failure(&job2, &st2, c, e),
            }
            st2.borrow_mut().inflight -= 1;
            job2.kick();
        });
    }
    let e = st.borrow_mut().error.take();
    e
}

/// Commits (`ok`) the new backing: header first, then the in-memory link, with
/// the device quiesced so no request is traversing the chain meanwhile; then
/// releases the images between top and base that nothing else uses.
async fn finish(plan: StreamPlan, ok: bool) -> Result<(), String> {
    if !ok {
        return Ok(());
    }
    let Some(top) = plan.top.clone() else {
        return Ok(());
    };
    if plan.noop {
        // Nothing was copied and the chain stays, but QEMU's stream_prepare
        // still records the base's name (as QEMU gives it) in the header.
        if plan.base.is_some() {
            top.set_backing_file(
                plan.backing_file.as_deref(),
                plan.backing_format.as_deref(),
                plan.durable,
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let rt = reactor::handle().ok_or_else(|| "not on a reactor".to_string())?;
    let dev = plan.device.as_ref().and_then(Device::from_bdev);
    if let Some(d) = dev {
        d.quiesce(&rt).await.map_err(|e| e.to_string())?;
    }
    let r = async {
        top.set_backing_file(
            plan.backing_file.as_deref(),
            plan.backing_format.as_deref(),
            plan.durable,
        )
        .await?;
        top.set_backing_bdev(plan.base.clone()).await
    }
    .await;
    if let Some(d) = dev {
        d.resume(&rt).await;
    }
    r.map_err(|e| e.to_string())?;
    // Claims moved with the link (the top let go of its old backing and
    // claims the base). Going down, each image nothing claims any more is
    // released, and lets go of what is below it in turn.
    for b in &plan.intermediates {
        let name = b.name();
        let g = &plan.graph;
        if g.nodes().contains(name) && g.nodes().claims(name).is_empty() {
            if let Ok(b) = g.unregister_from_reactor(name).await {
                if let Some(img) = node::image(&b) {
                    if let Err(e) = img.set_backing_bdev(None).await {
                        tracing::warn!(node = name, error = %e, "cannot unlink released image");
                    }
                }
                // Trim the file its open extended (after a flush, for a durable job).
                if let Some(q) = b.as_any().downcast_ref::<bdev::qcow2::Qcow2Bdev>() {
                    let r = if plan.durable {
                        q.close().await
                    } else {
                        q.trim_file().await
                    };
                    if let Err(e) = r {
                        tracing::warn!(node = name, error = %e, "cannot close released image");
                    }
                }
                b.on_delete();
                tracing::info!(node = name, "intermediate image released after stream");
            }
        }
    }
    Ok(())
}

/// The job's task (the job is already running): the copy, then QEMU's completion sequence.
pub async fn run(job: Arc<Job>, plan: StreamPlan, t: Tuning) {
    let t0 = std::time::Instant::now();
    let error = if plan.noop {
        None
    } else {
        copy_all(&job, &plan, &t).await
    };
    let copy_s = t0.elapsed().as_secs_f64();
    let id = job.id().to_string();
    let mut p = plan;
    // A top that is a backing file gets its reader's lock back before the
    // job concludes (QEMU's stream_clean reopens it read-only): the guard
    // is dropped once the final change is done.
    let e = job
        .complete(error, move |ok| async move {
            let writer = p.writer.take();
            let graph = p.graph.clone();
            // The final backing change is a graph change: serialised.
            let change = graph.change_on_reactor().await;
            let r = finish(p, ok).await;
            drop(change);
            drop(writer);
            r
        })
        .await;
    let total_s = t0.elapsed().as_secs_f64();
    match e {
        Some(e) => tracing::warn!(job = %id, error = %e, copy_s, total_s, "stream job failed"),
        None => {
            tracing::info!(job = %id, cancelled = job.is_cancelled(), copy_s, total_s, "stream job ended")
        }
    }
}

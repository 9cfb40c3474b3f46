//! The copy loop (see the module doc of `copy`).

use super::{strerror, Chunk, CopyError, CopyOps, Prefix, Share, Tuning, Window};
use crate::job::{IoOperation, Job, Verdict};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// State shared by the loop and its chunk tasks (one reactor).
struct Shared {
    inflight: usize,
    /// Chunks that ended (done or failed): the slow start's ramp.
    ended: usize,
    /// Chunks to (re)try before walking on: stopped by the error policy, or
    /// put back while the window or the speed limit is full.
    queue: VecDeque<Chunk>,
    error: Option<String>,
    report: bool,
    /// Progress: the done prefix of the walk.
    prefix: Prefix,
}

impl Shared {
    fn note_error(&mut self, errno: i32) {
        if self.error.is_none() {
            self.error = Some(strerror(errno));
        }
    }

    /// Marks the walk's range `[from, to)` done; the job's offset follows
    /// the done prefix.
    fn done(&mut self, job: &Job, from: u64, to: u64) {
        let n = self.prefix.complete(from, to);
        if n > 0 {
            job.add_progress(n);
        }
    }

    /// A chunk done (copied, or failed and ignored): the walk's range it
    /// accounts for ends at its end and is `progress` long.
    fn chunk_done(&mut self, job: &Job, c: Chunk) {
        let end = c.offset + c.len;
        self.done(job, end - c.progress, end);
    }
}

/// Applies the error policy to a failed chunk.
fn on_failure(job: &Job, st: &RefCell<Shared>, c: Chunk, e: CopyError) {
    let verdict = job.io_error(e.op, e.errno);
    let mut s = st.borrow_mut();
    match verdict {
        Verdict::Report => {
            s.note_error(e.errno);
            s.report = true;
        }
        Verdict::Ignore => {
            s.note_error(e.errno);
            s.chunk_done(job, c);
        }
        Verdict::Stop => s.queue.push_back(c),
    }
}

async fn wait_kick_or(job: &Job, d: Duration) {
    let sleep = Box::pin(reactor::sleep(d));
    let kick = Box::pin(job.wait_kick());
    let _ = futures::future::select(sleep, kick).await;
}

/// The longest wait between two looks at the speed limit (a speed change
/// also wakes the loop).
const RATE_POLL: Duration = Duration::from_millis(50);

/// Copies what `ops` says must be copied, for `job` (already running, on
/// this reactor). See the module doc.
pub async fn copy_all<O: CopyOps>(job: &Arc<Job>, ops: Rc<O>, t: &Tuning) -> Result<(), String> {
    let size = ops.size();
    let gran = ops.granularity().max(512);
    let chunk_max = (t.chunk.max(gran) / gran) * gran;
    let max = t.max_inflight.max(1);
    let st = Rc::new(RefCell::new(Shared {
        inflight: 0,
        ended: 0,
        queue: VecDeque::with_capacity(max + 1),
        error: None,
        report: false,
        prefix: Prefix::default(),
    }));
    let clients = |o: &O| {
        if t.yield_to_clients {
            o.client_ops()
        } else {
            None
        }
    };
    let period = (reactor::ticks_hz() as u128 * t.sample.as_nanos() / 1_000_000_000) as u64;
    let mut win = Window::new(max, period, clients(&ops), reactor::ticks());
    let mut cursor = 0u64;
    // The extent being copied: [cursor, end), and whether it reads as zeroes.
    let mut extent: Option<(u64, bool)> = None;
    // This copy's part of the reactor's budget (left when the loop ends).
    let share = Share::join(t.reactor_inflight);
    loop {
        let (inflight, report, queued, ended) = {
            let s = st.borrow();
            (s.inflight, s.report, !s.queue.is_empty(), s.ended)
        };
        let stopping = job.is_cancelled() || report || job.pause_requested();
        share.set_hungry(!stopping && (queued || cursor < size));
        if stopping {
            if inflight > 0 {
                job.wait_kick().await;
                continue;
            }
            if report || job.is_cancelled() {
                break;
            }
            // Pausing: the done prefix reaches the disk first (see the module doc).
            ops.settle().await;
            if !job.pause_point().await {
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
                None => match ops.extent(cursor, size - cursor).await {
                    Ok(x) => {
                        let len = x.len.clamp(1, size - cursor);
                        if !x.copy {
                            st.borrow_mut().done(job, cursor, cursor + len);
                            cursor += len;
                            continue;
                        }
                        (cursor + len, x.zero)
                    }
                    Err(errno) => {
                        // The range is unknown: fail, skip or retry one granule.
                        let n = (gran - cursor % gran).min(size - cursor);
                        let c = Chunk {
                            offset: cursor,
                            len: n,
                            zero: false,
                            progress: n,
                        };
                        let e = CopyError {
                            op: IoOperation::Read,
                            errno,
                        };
                        on_failure(job, &st, c, e);
                        let mut s = st.borrow_mut();
                        if s.queue.back() == Some(&c) {
                            // Stopped: ask again after resume.
                            s.queue.pop_back();
                        } else if !s.report {
                            cursor += n;
                        }
                        continue;
                    }
                },
            };
            let start = cursor / gran * gran;
            // While clients are busy, chunks shrink with the window (down to one
            // granule), so no client request waits behind a large copy.
            let w = win.sample(clients(&ops), reactor::ticks());
            let chunk = (chunk_max * w as u64 / win.max() as u64 / gran).max(1) * gran;
            let end = (start + chunk)
                .min(ext_end.next_multiple_of(gran))
                .min(size);
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
            // Done, once the speed limit's debt is paid: a limited job lasts
            // at least bytes/speed, as QEMU's does.
            match job.rate_delay(0) {
                None => break,
                Some(ns) => {
                    wait_kick_or(job, Duration::from_nanos(ns).min(RATE_POLL)).await;
                    continue;
                }
            }
        } else {
            job.wait_kick().await;
            continue;
        };
        let w = win.sample(clients(&ops), reactor::ticks());
        let ramp = if t.slow_start { ended } else { usize::MAX };
        if inflight >= share.limit(w, ramp) {
            st.borrow_mut().queue.push_front(c);
            wait_kick_or(job, t.sample).await;
            continue;
        }
        if let Some(ns) = job.rate_delay(c.len) {
            st.borrow_mut().queue.push_front(c);
            wait_kick_or(job, Duration::from_nanos(ns).min(RATE_POLL)).await;
            continue;
        }
        // A throttle group shared with other jobs and devices: the chunk
        // takes its place in the group's order and waits for it.
        if let Some(limit) = &job.spec().throttle {
            let ns = limit.reserve(c.len);
            if ns > 0 {
                reactor::sleep(Duration::from_nanos(ns)).await;
            }
        }
        st.borrow_mut().inflight += 1;
        let (job2, st2, ops2) = (job.clone(), st.clone(), ops.clone());
        reactor::spawn_local(async move {
            let r = ops2.copy(c).await;
            match r {
                Ok(()) => st2.borrow_mut().chunk_done(&job2, c),
                Err(e) => on_failure(&job2, &st2, c, e),
            }
            {
                let mut s = st2.borrow_mut();
                s.inflight -= 1;
                s.ended += 1;
            }
            job2.kick();
        });
    }
    let e = st.borrow_mut().error.take();
    match e {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

//! One perf job: a bdev, a reactor, a queue depth of preallocated requests that
//! are resubmitted from their completion callback. Per request: no allocation,
//! no system call, no atomic; latencies from the tick counter into a histogram.

use super::args::Workload;
use super::hist::Histogram;
use super::pattern::{self, Mismatch};
use bdev::{BdevIo, DmaBuf, IoChannel, IoDone, IoStatus, IoType};
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

/// What a job does (built on the main thread, sent to its reactor).
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Target bdev.
    pub bdev: String,
    /// Reactor index.
    pub reactor: usize,
    /// CPU core of that reactor.
    pub core: usize,
    /// Workload.
    pub workload: Workload,
    /// Bytes per request.
    pub io_size: u64,
    /// Requests in flight.
    pub queue_depth: u32,
    /// Percentage of reads for mixed workloads.
    pub read_percent: u32,
    /// First byte of this job's share of the bdev.
    pub region_start: u64,
    /// Number of `io_size` requests that fit in the share.
    pub region_ios: u64,
    /// Run time in ticks.
    pub run_ticks: u64,
    /// Count I/O errors instead of stopping at the first.
    pub continue_on_failure: bool,
    /// Seed of the random offsets and of the verify pattern.
    pub seed: u64,
}

/// What a job measured.
#[derive(Clone)]
pub struct JobResult {
    /// The job.
    pub spec: JobSpec,
    /// Requests completed successfully.
    pub ios: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Requests that failed.
    pub fails: u64,
    /// Ticks from start to last completion.
    pub runtime_ticks: u64,
    /// Sum, min and max of successful latencies (ticks).
    pub lat_sum: u64,
    /// Minimum latency.
    pub lat_min: u64,
    /// Maximum latency.
    pub lat_max: u64,
    /// Latency distribution (ticks).
    pub hist: Histogram,
    /// The first verify mismatch.
    pub mismatch: Option<Mismatch>,
    /// The first failed request's status and offset.
    pub first_error: Option<(IoStatus, u64)>,
}

const READ_TAG: u64 = 1 << 63;

/// Verify state of one queue slot: the request not in flight and what was written.
struct VerifySlot {
    idle: Option<Box<BdevIo>>,
    offset: u64,
    gen: u64,
}

pub(crate) struct Job {
    spec: JobSpec,
    ch: Rc<IoChannel>,
    me: Weak<Job>,
    start_tick: Cell<u64>,
    end_tick: Cell<u64>,
    last_tick: Cell<u64>,
    rng: Cell<u64>,
    seq: Cell<u64>,
    inflight: Cell<u32>,
    stopping: Cell<bool>,
    ios: Cell<u64>,
    bytes: Cell<u64>,
    fails: Cell<u64>,
    lat_sum: Cell<u64>,
    lat_min: Cell<u64>,
    lat_max: Cell<u64>,
    hist: RefCell<Histogram>,
    gen: Cell<u64>,
    verify: RefCell<Vec<VerifySlot>>,
    /// Verify: one bit per block of the region, set while a slot's write and
    /// read-back of that block are out, so no two slots ever overlap (as
    /// bdevperf's `outstanding` bit array): otherwise a slow write could land
    /// after a newer one to the same block and fail a correct device.
    outstanding: RefCell<Vec<u64>>,
    scratch: RefCell<Vec<u8>>,
    mismatch: RefCell<Option<Mismatch>>,
    first_error: Cell<Option<(IoStatus, u64)>>,
    // Requests travel as boxes (the channel API); keeping them boxed avoids a move each.
    #[allow(clippy::vec_box)]
    parked: RefCell<Vec<Box<BdevIo>>>,
    waiting: Cell<bool>,
    #[allow(clippy::vec_box)]
    starting: RefCell<Vec<Box<BdevIo>>>,
    result: RefCell<Option<oneshot::Sender<JobResult>>>,
}

impl Job {
    /// Builds the job and its requests on the current reactor.
    pub(crate) fn new(
        spec: JobSpec,
        ch: Rc<IoChannel>,
    ) -> Result<(Rc<Job>, oneshot::Receiver<JobResult>), bdev::BdevError> {
        let (tx, rx) = oneshot::channel();
        let active = (spec.queue_depth as u64).min(if spec.workload == Workload::Verify {
            spec.region_ios
        } else {
            u64::MAX
        });
        let job = Rc::new_cyclic(|me| Job {
            ch,
            me: me.clone(),
            start_tick: Cell::new(0),
            end_tick: Cell::new(0),
            last_tick: Cell::new(0),
            rng: Cell::new(spec.seed | 1),
            seq: Cell::new(0),
            inflight: Cell::new(0),
            stopping: Cell::new(false),
            ios: Cell::new(0),
            bytes: Cell::new(0),
            fails: Cell::new(0),
            lat_sum: Cell::new(0),
            lat_min: Cell::new(u64::MAX),
            lat_max: Cell::new(0),
            hist: RefCell::new(Histogram::default()),
            gen: Cell::new(0),
            verify: RefCell::new(Vec::new()),
            outstanding: RefCell::new(if spec.workload == Workload::Verify {
                vec![0; spec.region_ios.div_ceil(64) as usize]
            } else {
                Vec::new()
            }),
            scratch: RefCell::new(Vec::new()),
            mismatch: RefCell::new(None),
            first_error: Cell::new(None),
            parked: RefCell::new(Vec::new()),
            waiting: Cell::new(false),
            starting: RefCell::new(Vec::new()),
            result: RefCell::new(Some(tx)),
            spec,
        });
        let done: Rc<dyn IoDone> = job.clone();
        let mut reqs = Vec::with_capacity(active as usize);
        for slot in 0..active {
            let w = job.spec.workload;
            let io = if w.has_data() {
                let buf = DmaBuf::new(job.spec.io_size as usize)?;
                let t = if matches!(w, Workload::Write | Workload::RandWrite | Workload::Verify) {
                    IoType::Write
                } else {
                    IoType::Read
                };
                BdevIo::new(t, 0, job.spec.io_size, Some(buf), Some(done.clone()))
            } else {
                let t = match w {
                    Workload::Flush => IoType::Flush,
                    Workload::Unmap => IoType::Unmap,
                    _ => IoType::WriteZeroes,
                };
                BdevIo::new(t, 0, job.spec.io_size, None, Some(done.clone()))
            };
            let mut io = io;
            io.tag = slot;
            if w == Workload::Verify {
                let rbuf = DmaBuf::new(job.spec.io_size as usize)?;
                let mut r = BdevIo::read(0, rbuf, Some(done.clone()));
                r.tag = slot | READ_TAG;
                job.verify.borrow_mut().push(VerifySlot {
                    idle: Some(r),
                    offset: 0,
                    gen: 0,
                });
            }
            reqs.push(io);
        }
        *job.starting.borrow_mut() = reqs;
        Ok((job, rx))
    }

    /// Submits every request; the run lasts `run_ticks` from now.
    pub(crate) fn start(&self) {
        let now = reactor::ticks();
        self.start_tick.set(now);
        self.last_tick.set(now);
        self.end_tick.set(now + self.spec.run_ticks);
        let reqs = std::mem::take(&mut *self.starting.borrow_mut());
        if reqs.is_empty() {
            self.finish();
            return;
        }
        for mut io in reqs {
            self.inflight.set(self.inflight.get() + 1);
            self.prepare(&mut io);
            self.submit(io);
        }
    }

    #[inline(always)]
    fn next_rand(&self) -> u64 {
        // xorshift64*
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[inline(always)]
    fn next_offset(&self) -> u64 {
        let n = self.spec.region_ios;
        let idx = if self.spec.workload.random() {
            ((self.next_rand() as u128 * n as u128) >> 64) as u64
        } else {
            let s = self.seq.get();
            self.seq.set(if s + 1 >= n { 0 } else { s + 1 });
            s
        };
        self.spec.region_start + idx * self.spec.io_size
    }

    /// Verify: the next offset no other slot has out, marked as out. A free one
    /// always exists: a verify job has at most one slot per block.
    fn claim_free_offset(&self) -> u64 {
        let mut bits = self.outstanding.borrow_mut();
        let mut off = self.next_offset();
        for _ in 0..self.spec.region_ios {
            let i = ((off - self.spec.region_start) / self.spec.io_size) as usize;
            if let Some(w) = bits.get_mut(i / 64) {
                if *w & (1 << (i % 64)) == 0 {
                    *w |= 1 << (i % 64);
                    return off;
                }
            }
            off = self.next_offset();
        }
        off
    }

    /// Verify: the block at `off` is no longer out.
    fn release_offset(&self, off: u64) {
        let i = ((off.saturating_sub(self.spec.region_start)) / self.spec.io_size) as usize;
        if let Some(w) = self.outstanding.borrow_mut().get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// Points a (write or plain) request at its next target.
    #[inline(always)]
    fn prepare(&self, io: &mut BdevIo) {
        match self.spec.workload {
            Workload::Flush => {}
            Workload::Rw | Workload::RandRw => {
                let read =
                    ((self.next_rand() as u128 * 100) >> 64) < self.spec.read_percent as u128;
                io.io_type = if read { IoType::Read } else { IoType::Write };
                io.offset = self.next_offset();
            }
            Workload::Verify => {
                let off = self.claim_free_offset();
                let gen = self.gen.get() + 1;
                self.gen.set(gen);
                io.offset = off;
                let mut scratch = self.scratch.borrow_mut();
                scratch.resize(self.spec.io_size as usize, 0);
                pattern::fill(&mut scratch, off, gen, self.spec.seed);
                io.copy_in(0, &scratch);
                if let Some(s) = self.verify.borrow_mut().get_mut(io.tag as usize) {
                    s.offset = off;
                    s.gen = gen;
                }
            }
            _ => io.offset = self.next_offset(),
        }
        io.status = IoStatus::Pending;
    }

    #[inline(always)]
    fn submit(&self, io: Box<BdevIo>) {
        if let Err(io) = self.ch.submit(io) {
            self.park(io);
        }
    }

    /// Queue full: keep the request and retry when the bdev has room.
    fn park(&self, io: Box<BdevIo>) {
        self.parked.borrow_mut().push(io);
        if !self.waiting.replace(true) {
            let me = self.me.clone();
            self.ch.wait_for_space(Box::new(move || {
                if let Some(j) = me.upgrade() {
                    j.unpark();
                }
            }));
        }
    }

    fn unpark(&self) {
        self.waiting.set(false);
        let ios = std::mem::take(&mut *self.parked.borrow_mut());
        for io in ios {
            self.submit(io);
        }
    }

    /// Retires a request at the end of the run.
    fn retire(&self, io: Box<BdevIo>) {
        drop(io);
        let n = self.inflight.get() - 1;
        self.inflight.set(n);
        if n == 0 {
            self.finish();
        }
    }

    fn failed(&self, io: &BdevIo) {
        self.fails.set(self.fails.get() + 1);
        if self.first_error.get().is_none() {
            self.first_error.set(Some((io.status, io.offset)));
        }
        if !self.spec.continue_on_failure {
            self.stopping.set(true);
        }
    }

    fn finish(&self) {
        let Some(tx) = self.result.borrow_mut().take() else {
            return;
        };
        let ios = self.ios.get();
        let r = JobResult {
            spec: self.spec.clone(),
            ios,
            bytes: self.bytes.get(),
            fails: self.fails.get(),
            runtime_ticks: self
                .last_tick
                .get()
                .saturating_sub(self.start_tick.get())
                .max(1),
            lat_sum: self.lat_sum.get(),
            lat_min: if ios == 0 { 0 } else { self.lat_min.get() },
            lat_max: self.lat_max.get(),
            hist: self.hist.borrow().clone(),
            mismatch: self.mismatch.borrow_mut().take(),
            first_error: self.first_error.get(),
        };
        let _ = tx.send(r);
        // The idle verify requests point back at the job: drop them to free it.
        let idle = std::mem::take(&mut *self.verify.borrow_mut());
        drop(idle);
    }

    /// Verify: a write finished (submit its read-back) or a read finished (check it).
    fn verify_done(&self, io: Box<BdevIo>) {
        let slot = (io.tag & !READ_TAG) as usize;
        let is_read = io.tag & READ_TAG != 0;
        let (mut other, offset, gen) = {
            let mut v = self.verify.borrow_mut();
            let Some(s) = v.get_mut(slot) else {
                return self.retire(io);
            };
            (s.idle.take(), s.offset, s.gen)
        };
        if !is_read {
            // Read back what was just written.
            let Some(mut r) = other.take() else {
                return self.retire(io);
            };
            if let Some(s) = self.verify.borrow_mut().get_mut(slot) {
                s.idle = Some(io);
            }
            r.offset = offset;
            r.status = IoStatus::Pending;
            self.submit(r);
            return;
        }
        if let Some(buf) = io.buf() {
            let mut scratch = self.scratch.borrow_mut();
            if let Some(m) =
                pattern::check(buf.as_slice(), offset, gen, self.spec.seed, &mut scratch)
            {
                if self.mismatch.borrow().is_none() {
                    *self.mismatch.borrow_mut() = Some(m);
                }
                self.stopping.set(true);
            }
        }
        self.release_offset(offset);
        let Some(mut w) = other.take() else {
            return self.retire(io);
        };
        if let Some(s) = self.verify.borrow_mut().get_mut(slot) {
            s.idle = Some(io);
        }
        if self.stopping.get() || self.last_tick.get() >= self.end_tick.get() {
            return self.retire(w);
        }
        self.prepare(&mut w);
        self.submit(w);
    }
}

impl IoDone for Job {
    #[inline]
    fn io_done(&self, mut io: Box<BdevIo>) {
        // The channel read the clock at completion; reuse it (one read per request).
        let now = if io.complete_tick != 0 {
            io.complete_tick
        } else {
            reactor::ticks()
        };
        self.last_tick.set(now);
        if io.status == IoStatus::Success {
            let lat = now.wrapping_sub(io.submit_tick);
            self.ios.set(self.ios.get() + 1);
            self.bytes.set(self.bytes.get() + io.len);
            self.lat_sum.set(self.lat_sum.get() + lat);
            if lat < self.lat_min.get() {
                self.lat_min.set(lat);
            }
            if lat > self.lat_max.get() {
                self.lat_max.set(lat);
            }
            self.hist.borrow_mut().record(lat);
        } else {
            self.failed(&io);
        }
        if self.spec.workload == Workload::Verify {
            if io.status != IoStatus::Success {
                // A failed write or read ends this slot's cycle.
                let slot = (io.tag & !READ_TAG) as usize;
                let (other, off) = match self.verify.borrow_mut().get_mut(slot) {
                    Some(s) => (s.idle.take(), Some(s.offset)),
                    None => (None, None),
                };
                if let Some(off) = off {
                    self.release_offset(off);
                }
                drop(other);
                return self.retire(io);
            }
            return self.verify_done(io);
        }
        if self.stopping.get() || now >= self.end_tick.get() {
            return self.retire(io);
        }
        self.prepare(&mut io);
        if let Err(io) = self.ch.submit_at(io, now) {
            self.park(io);
        }
    }
}

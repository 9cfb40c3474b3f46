//! One submission/completion queue pair: ring memory, command building (read,
//! write, flush, write zeroes, dataset management), PRP lists, splitting by the
//! maximum transfer size, bounce buffers for memory the device cannot reach,
//! phase-bit completion polling with one doorbell write per batch, and command
//! timeouts. It knows nothing of VFIO: it writes doorbells through
//! [`RegisterIo`] and addresses memory through [`DmaSpace`], so a software
//! controller in memory can drive it in tests and benchmarks.

use super::error::NvmeError;
use super::mem::{DmaRegion, DmaSpace, PagePool};
use super::regs::RegisterIo;
use super::spec::{
    self, doorbell_offset, nvm, status, Command, Completion, CQE_SIZE, PAGE_SIZE, SQE_SIZE,
};
use crate::io::{BdevIo, IoStatus, IoType};
use smallvec::SmallVec;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// How a queue pair is built.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Queue id (0: admin).
    pub qid: u16,
    /// Entries per queue (at most the controller's CAP.MQES).
    pub entries: u16,
    /// Doorbell stride in bytes (CAP.DSTRD).
    pub doorbell_stride: usize,
    /// Largest transfer of one command in bytes (MDTS, at most 2 MiB: one PRP list page).
    pub max_xfer: usize,
    /// Pages of bounce memory for buffers the device cannot reach directly (0: none).
    pub bounce_pages: usize,
    /// Ticks after which an outstanding command is aborted (0: never).
    pub timeout_ticks: u64,
}

/// What the queue pair needs to know about the namespace of a request.
#[derive(Debug, Clone, Copy)]
pub struct NsParams {
    /// Namespace id.
    pub nsid: u32,
    /// log2 of the logical block size.
    pub lba_shift: u32,
    /// Largest Write Zeroes in blocks (0: unsupported; emulated by the bdev layer above).
    pub max_zeroes_blocks: u32,
}

/// Largest transfer the driver builds in one command: one PRP list page.
pub const MAX_XFER_LIMIT: usize = (PAGE_SIZE / 8) * PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Free,
    Req(u32),
    Raw,
}

#[derive(Debug, Clone, Copy)]
struct Tracker {
    target: Target,
    submit_tick: u64,
    abort_tick: u64,
    cqe: Option<Completion>,
}

struct Req {
    io: Option<Box<BdevIo>>,
    ns: NsParams,
    outstanding: u32,
    status: IoStatus,
    bounce: Option<(usize, usize)>,
    /// A FUA discard: once its commands are done, a Flush follows (Dataset
    /// Management has no FUA bit).
    flush_after: bool,
}

/// What the timeout scan asks the owner of the queue pair to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutAction {
    /// Send an Abort for this command id of this queue.
    Abort { sqid: u16, cid: u16 },
    /// An aborted command still did not complete: reset the controller.
    Reset,
}

/// A submission/completion queue pair, used from one thread.
pub struct QueuePair {
    qid: u16,
    entries: u16,
    regs: Arc<dyn RegisterIo>,
    dma: Arc<dyn DmaSpace>,
    sq_db: usize,
    cq_db: usize,
    rings: DmaRegion,
    sq: *mut Command,
    cq: *mut Completion,
    prp_off: usize,
    sq_tail: u16,
    sq_dirty: bool,
    cq_head: u16,
    phase: u16,
    trackers: Vec<Tracker>,
    free_cids: Vec<u16>,
    reqs: Vec<Req>,
    free_reqs: Vec<u32>,
    bounce: Option<PagePool>,
    max_xfer: usize,
    timeout_ticks: u64,
    next_timeout_check: u64,
    // Boxes: requests are owned as Box<BdevIo> throughout the bdev API.
    #[allow(clippy::vec_box)]
    done: Vec<Box<BdevIo>>,
    inflight: usize,
}

// SAFETY: the raw pointers point into `rings`, which the queue pair owns; it is
// moved to its reactor before use and then used from that thread only.
unsafe impl Send for QueuePair {}

fn align_page(n: usize) -> usize {
    n.next_multiple_of(PAGE_SIZE)
}

/// Maps an NVMe status (SCT << 8 | SC, phase removed) to the bdev status.
pub fn io_status(sc: u16) -> IoStatus {
    match sc & 0x7ff {
        status::SUCCESS => IoStatus::Success,
        status::INVALID_OPCODE => IoStatus::Unsupported,
        status::INVALID_FIELD | status::INVALID_NAMESPACE | status::LBA_OUT_OF_RANGE => {
            IoStatus::Einval
        }
        status::CAPACITY_EXCEEDED => IoStatus::Enospc,
        status::ABORTED_BY_REQUEST | status::ABORTED_SQ_DELETION | status::ABORTED_POWER_LOSS => {
            IoStatus::Aborted
        }
        status::WRITE_TO_READ_ONLY => IoStatus::ReadOnly,
        _ => IoStatus::Eio,
    }
}

impl QueuePair {
    /// Allocates the rings, PRP list pages and bounce pool of a queue pair.
    /// The controller must still be told about it (Create I/O CQ/SQ, or AQA/ASQ/ACQ).
    pub fn new(
        cfg: QueueConfig,
        regs: Arc<dyn RegisterIo>,
        dma: Arc<dyn DmaSpace>,
    ) -> Result<Self, NvmeError> {
        if cfg.entries < 2 {
            return Err(NvmeError::InvalidParam(format!(
                "queue of {} entries",
                cfg.entries
            )));
        }
        let max_xfer = cfg.max_xfer.clamp(PAGE_SIZE, MAX_XFER_LIMIT) / PAGE_SIZE * PAGE_SIZE;
        let n = cfg.entries as usize;
        let sq_len = align_page(n * SQE_SIZE);
        let cq_len = align_page(n * CQE_SIZE);
        let prp_off = sq_len + cq_len;
        let rings = DmaRegion::new(dma.clone(), prp_off + (n - 1) * PAGE_SIZE)?;
        let bounce = if cfg.bounce_pages > 0 {
            Some(PagePool::new(dma.clone(), cfg.bounce_pages)?)
        } else {
            None
        };
        let sq = rings.ptr() as *mut Command;
        let cq = rings.ptr().wrapping_add(sq_len) as *mut Completion;
        let trackers = vec![
            Tracker {
                target: Target::Free,
                submit_tick: 0,
                abort_tick: 0,
                cqe: None
            };
            n - 1
        ];
        let mut qp = Self {
            qid: cfg.qid,
            entries: cfg.entries,
            sq_db: doorbell_offset(cfg.qid, false, cfg.doorbell_stride),
            cq_db: doorbell_offset(cfg.qid, true, cfg.doorbell_stride),
            regs,
            dma,
            rings,
            sq,
            cq,
            prp_off,
            sq_tail: 0,
            sq_dirty: false,
            cq_head: 0,
            phase: 1,
            trackers,
            free_cids: (0..(n - 1) as u16).rev().collect(),
            reqs: (0..n - 1)
                .map(|_| Req {
                    io: None,
                    ns: NsParams {
                        nsid: 0,
                        lba_shift: 9,
                        max_zeroes_blocks: 0,
                    },
                    outstanding: 0,
                    status: IoStatus::Success,
                    flush_after: false,
                    bounce: None,
                })
                .collect(),
            free_reqs: (0..(n - 1) as u32).rev().collect(),
            bounce,
            max_xfer,
            timeout_ticks: cfg.timeout_ticks,
            next_timeout_check: 0,
            done: Vec::with_capacity(n),
            inflight: 0,
        };
        qp.clear_rings();
        Ok(qp)
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Entries per queue.
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// Device address of the submission queue.
    pub fn sq_iova(&self) -> u64 {
        self.rings.iova()
    }
    /// Device address of the completion queue.
    pub fn cq_iova(&self) -> u64 {
        self.rings.iova() + align_page(self.entries as usize * SQE_SIZE) as u64
    }
    /// Commands outstanding at the device plus requests waiting to be handed back.
    pub fn inflight(&self) -> usize {
        self.inflight
    }
    /// Largest transfer of one command in bytes.
    pub fn max_xfer(&self) -> usize {
        self.max_xfer
    }
    /// Command slots free now.
    pub fn free_slots(&self) -> usize {
        self.free_cids.len()
    }

    fn clear_rings(&mut self) {
        self.rings.zero(0, self.prp_off);
        self.sq_tail = 0;
        self.sq_dirty = false;
        self.cq_head = 0;
        self.phase = 1;
    }

    #[inline]
    fn prp_page(&self, cid: u16) -> (*mut u64, u64) {
        let (p, iova) = self.rings.at(self.prp_off + cid as usize * PAGE_SIZE);
        (p as *mut u64, iova)
    }

    #[inline]
    fn push_sqe(&mut self, cmd: &Command) {
        // SAFETY: sq_tail < entries, so the slot lies inside the submission ring;
        // the device reads it only after the doorbell write that follows.
        unsafe { self.sq.add(self.sq_tail as usize).write_volatile(*cmd) };
        self.sq_tail += 1;
        if self.sq_tail == self.entries {
            self.sq_tail = 0;
        }
        self.sq_dirty = true;
    }

    /// Writes the submission doorbell if commands were queued since the last call.
    #[inline]
    pub fn ring(&mut self) {
        if self.sq_dirty {
            self.sq_dirty = false;
            self.regs.write32(self.sq_db, self.sq_tail as u32);
        }
    }

    /// Queues a raw command (admin commands, aborts) and returns its command id;
    /// `Err` gives it back when every slot is taken. Fetch the result with
    /// [`QueuePair::take_raw`] after [`QueuePair::process_completions`].
    pub fn submit_raw(&mut self, mut cmd: Command, now: u64) -> Result<u16, Command> {
        let Some(cid) = self.free_cids.pop() else {
            return Err(cmd);
        };
        cmd.cid = cid;
        self.trackers[cid as usize] = Tracker {
            target: Target::Raw,
            submit_tick: now,
            abort_tick: 0,
            cqe: None,
        };
        self.push_sqe(&cmd);
        self.inflight += 1;
        Ok(cid)
    }

    /// The completion of raw command `cid`, once it arrived (frees the slot).
    pub fn take_raw(&mut self, cid: u16) -> Option<Completion> {
        let t = self.trackers.get_mut(cid as usize)?;
        if t.target != Target::Raw {
            return None;
        }
        let cqe = t.cqe.take()?;
        t.target = Target::Free;
        self.free_cids.push(cid);
        self.inflight -= 1;
        Some(cqe)
    }

    /// Gives up on raw command `cid` (its completion, if it ever comes, is dropped).
    pub fn forget_raw(&mut self, cid: u16) {
        if let Some(t) = self.trackers.get_mut(cid as usize) {
            if t.target == Target::Raw {
                t.target = Target::Free;
                t.cqe = None;
                self.free_cids.push(cid);
                self.inflight -= 1;
            }
        }
    }

    fn fail_later(&mut self, mut io: Box<BdevIo>, st: IoStatus) {
        io.status = st;
        self.inflight += 1;
        self.done.push(io);
    }

    /// Queues a bdev request (split into as many commands as it needs). `Err`
    /// hands it back untouched when there are not enough free slots or bounce
    /// pages right now. Requests that cannot be carried out at all are completed
    /// with an error status through [`QueuePair::take_done`], never here.
    pub fn submit_io(
        &mut self,
        io: Box<BdevIo>,
        ns: &NsParams,
        now: u64,
    ) -> Result<(), Box<BdevIo>> {
        let shift = ns.lba_shift;
        let bmask = (1u64 << shift) - 1;
        if io.io_type != IoType::Flush && ((io.offset | io.len) & bmask != 0 || io.len == 0) {
            self.fail_later(io, IoStatus::Einval);
            return Ok(());
        }
        let slba = io.offset >> shift;
        let nblocks = io.len >> shift;
        match io.io_type {
            IoType::Read | IoType::Write => {
                let len = io.len as usize;
                let children = len.div_ceil(self.max_xfer);
                if children > self.trackers.len() {
                    self.fail_later(io, IoStatus::Nomem);
                    return Ok(());
                }
                if children > self.free_cids.len() {
                    return Err(io);
                }
                let mut segs: SmallVec<[(u64, usize); 4]> = SmallVec::new();
                let mut bounce = None;
                if !self.direct_segments(&io, len, &mut segs) {
                    let pages = len.div_ceil(PAGE_SIZE);
                    let Some(pool) = self.bounce.as_mut() else {
                        self.fail_later(io, IoStatus::Nomem);
                        return Ok(());
                    };
                    if pages > pool.capacity() {
                        self.fail_later(io, IoStatus::Nomem);
                        return Ok(());
                    }
                    let Some(first) = pool.alloc(pages) else {
                        return Err(io);
                    };
                    let (p, iova) = pool.page(first);
                    if io.io_type == IoType::Write {
                        // SAFETY: the bounce pages are ours (just allocated) and `len`
                        // bytes long; the device does not touch them before submission.
                        io.copy_out(0, unsafe { std::slice::from_raw_parts_mut(p, len) });
                    }
                    segs.clear();
                    segs.push((iova, len));
                    bounce = Some((first, pages));
                }
                let opc = if io.io_type == IoType::Read {
                    nvm::READ
                } else {
                    nvm::WRITE
                };
                let fua = if io.fua && io.io_type == IoType::Write {
                    nvm::FUA
                } else {
                    0
                };
                let req = self.start_req(io, ns, children as u32, bounce);
                let mut cursor = (0usize, 0usize);
                let mut done = 0usize;
                let mut lba = slba;
                while done < len {
                    let clen = (len - done).min(self.max_xfer);
                    let cid = self.take_cid(req, now);
                    let (prp1, prp2) = self.fill_prps(cid, &segs, &mut cursor, clen);
                    let cmd = Command {
                        opc,
                        cid,
                        nsid: ns.nsid,
                        prp1,
                        prp2,
                        cdw10: lba as u32,
                        cdw11: (lba >> 32) as u32,
                        cdw12: ((clen >> shift) as u32 - 1) | fua,
                        ..Default::default()
                    };
                    self.push_sqe(&cmd);
                    done += clen;
                    lba += (clen >> shift) as u64;
                }
            }
            IoType::Flush => {
                if self.free_cids.is_empty() {
                    return Err(io);
                }
                let req = self.start_req(io, ns, 1, None);
                let cid = self.take_cid(req, now);
                self.push_sqe(&Command {
                    opc: nvm::FLUSH,
                    cid,
                    nsid: ns.nsid,
                    ..Default::default()
                });
            }
            IoType::WriteZeroes => {
                if ns.max_zeroes_blocks == 0 {
                    self.fail_later(io, IoStatus::Unsupported);
                    return Ok(());
                }
                let per = ns.max_zeroes_blocks as u64;
                let children = nblocks.div_ceil(per) as usize;
                if children > self.trackers.len() {
                    self.fail_later(io, IoStatus::Nomem);
                    return Ok(());
                }
                if children > self.free_cids.len() {
                    return Err(io);
                }
                // Write Zeroes has the FUA bit too (NVMe base spec, CDW12 bit 30).
                let fua = if io.fua { nvm::FUA } else { 0 };
                let req = self.start_req(io, ns, children as u32, None);
                let mut lba = slba;
                let end = slba + nblocks;
                while lba < end {
                    let n = (end - lba).min(per);
                    let cid = self.take_cid(req, now);
                    self.push_sqe(&Command {
                        opc: nvm::WRITE_ZEROES,
                        cid,
                        nsid: ns.nsid,
                        cdw10: lba as u32,
                        cdw11: (lba >> 32) as u32,
                        cdw12: (n - 1) as u32 | fua,
                        ..Default::default()
                    });
                    lba += n;
                }
            }
            IoType::Unmap => {
                // One Dataset Management command with up to 256 ranges of up to
                // 2^32 - 1 blocks, written into the command's PRP list page.
                const RANGE_MAX: u64 = u32::MAX as u64;
                let ranges = nblocks.div_ceil(RANGE_MAX);
                if ranges > 256 {
                    self.fail_later(io, IoStatus::Einval);
                    return Ok(());
                }
                if self.free_cids.is_empty() {
                    return Err(io);
                }
                let fua = io.fua;
                let req = self.start_req(io, ns, 1, None);
                self.reqs[req as usize].flush_after = fua;
                let cid = self.take_cid(req, now);
                let (page, iova) = self.prp_page(cid);
                let mut lba = slba;
                let end = slba + nblocks;
                let mut i = 0;
                while lba < end {
                    let n = (end - lba).min(RANGE_MAX);
                    // A range is 16 bytes: attributes, length in blocks, starting LBA.
                    let words = [n << 32, lba];
                    for (k, w) in words.iter().enumerate() {
                        // SAFETY: the PRP page of `cid` is 4096 bytes; at most 256
                        // ranges of 16 bytes are written into it.
                        unsafe { page.add(i * 2 + k).write_volatile(*w) };
                    }
                    lba += n;
                    i += 1;
                }
                self.push_sqe(&Command {
                    opc: nvm::DSM,
                    cid,
                    nsid: ns.nsid,
                    prp1: iova,
                    cdw10: (i - 1) as u32,
                    cdw11: nvm::DSM_AD,
                    ..Default::default()
                });
            }
        }
        Ok(())
    }

    /// Whether the request's memory can be described by PRPs directly; fills
    /// `segs` with (device address, length) pieces covering `len` bytes.
    #[inline]
    fn direct_segments(
        &self,
        io: &BdevIo,
        len: usize,
        segs: &mut SmallVec<[(u64, usize); 4]>,
    ) -> bool {
        let mut remaining = len;
        let iovs = io.iovs();
        for (i, v) in iovs.iter().enumerate() {
            if remaining == 0 {
                break;
            }
            let take = v.len().min(remaining);
            if take == 0 {
                continue;
            }
            let Some(iova) = self.dma.translate(v.as_ptr(), take) else {
                return false;
            };
            if iova & 3 != 0 || (i > 0 && !iova.is_multiple_of(PAGE_SIZE as u64)) {
                return false;
            }
            remaining -= take;
            if remaining > 0 && !(iova + take as u64).is_multiple_of(PAGE_SIZE as u64) {
                return false;
            }
            segs.push((iova, take));
        }
        remaining == 0
    }

    #[inline]
    fn start_req(
        &mut self,
        io: Box<BdevIo>,
        ns: &NsParams,
        children: u32,
        bounce: Option<(usize, usize)>,
    ) -> u32 {
        // Callers checked that `children` slots are free; requests never outnumber slots.
        let r = self
            .free_reqs
            .pop()
            .expect("request slots match command slots");
        let req = &mut self.reqs[r as usize];
        req.io = Some(io);
        req.ns = *ns;
        req.outstanding = children;
        req.status = IoStatus::Success;
        req.bounce = bounce;
        req.flush_after = false;
        self.inflight += 1;
        r
    }

    #[inline]
    fn take_cid(&mut self, req: u32, now: u64) -> u16 {
        let cid = self
            .free_cids
            .pop()
            .expect("slots were checked before building commands");
        self.trackers[cid as usize] = Tracker {
            target: Target::Req(req),
            submit_tick: now,
            abort_tick: 0,
            cqe: None,
        };
        cid
    }

    /// Fills the PRP entries for `len` bytes at `cursor` in `segs`.
    #[inline]
    fn fill_prps(
        &mut self,
        cid: u16,
        segs: &[(u64, usize)],
        cursor: &mut (usize, usize),
        mut len: usize,
    ) -> (u64, u64) {
        let (list, list_iova) = self.prp_page(cid);
        let mut n = 0usize;
        let mut prp1 = 0;
        let mut second = 0;
        while len > 0 {
            let (siova, slen) = segs[cursor.0];
            let addr = siova + cursor.1 as u64;
            let in_page = PAGE_SIZE - (addr % PAGE_SIZE as u64) as usize;
            let take = in_page.min(slen - cursor.1).min(len);
            if n == 0 {
                prp1 = addr;
            } else {
                if n == 1 {
                    second = addr;
                }
                // SAFETY: at most max_xfer / PAGE_SIZE + 1 <= 513 entries, so at most
                // 512 list entries: exactly one PRP list page, owned by this command.
                unsafe { list.add(n - 1).write_volatile(addr) };
            }
            n += 1;
            cursor.1 += take;
            len -= take;
            if cursor.1 == slen {
                cursor.0 += 1;
                cursor.1 = 0;
            }
        }
        match n {
            0 | 1 => (prp1, 0),
            2 => (prp1, second),
            _ => (prp1, list_iova),
        }
    }

    /// Reaps up to `max` completions (phase bit), writes the CQ head doorbell once
    /// for the batch, and moves finished requests to the done list. Returns how many
    /// completions it reaped.
    #[inline]
    pub fn process_completions(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            // SAFETY: cq_head < entries: the entry lies inside the completion ring.
            // The device writes it by DMA, so it is read with volatile reads only.
            let slot = unsafe { self.cq.add(self.cq_head as usize) };
            // SAFETY: as above; `status` is a field of the entry.
            let st = unsafe { std::ptr::addr_of!((*slot).status).read_volatile() };
            if st & 1 != self.phase {
                break;
            }
            // The rest of the entry is valid once the phase bit is seen.
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let cqe = unsafe { slot.read_volatile() };
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase ^= 1;
            }
            n += 1;
            self.complete_cmd(cqe);
        }
        if n > 0 {
            self.regs.write32(self.cq_db, self.cq_head as u32);
        }
        n
    }

    #[inline]
    fn complete_cmd(&mut self, cqe: Completion) {
        let cid = cqe.cid;
        let Some(t) = self.trackers.get_mut(cid as usize) else {
            tracing::warn!(
                qid = self.qid,
                cid,
                "completion for an unknown command id ignored"
            );
            return;
        };
        match t.target {
            Target::Free => {
                tracing::warn!(
                    qid = self.qid,
                    cid,
                    "completion for a command not outstanding ignored"
                );
            }
            Target::Raw => t.cqe = Some(cqe),
            Target::Req(r) => {
                t.target = Target::Free;
                self.free_cids.push(cid);
                let req = &mut self.reqs[r as usize];
                if !cqe.is_ok() && req.status.is_ok() {
                    req.status = io_status(cqe.status_code());
                    tracing::debug!(
                        qid = self.qid,
                        cid,
                        status = format_args!("{:#x}", cqe.status_code()),
                        "command failed"
                    );
                }
                req.outstanding -= 1;
                if req.outstanding == 0 && req.flush_after && req.status.is_ok() {
                    // The FUA discard's Flush, on the command id just freed.
                    req.flush_after = false;
                    req.outstanding = 1;
                    let nsid = req.ns.nsid;
                    let tick = t.submit_tick;
                    let cid = self.take_cid(r, tick);
                    self.push_sqe(&Command {
                        opc: nvm::FLUSH,
                        cid,
                        nsid,
                        ..Default::default()
                    });
                } else if req.outstanding == 0 {
                    self.finish_req(r);
                }
            }
        }
    }

    fn finish_req(&mut self, r: u32) {
        let req = &mut self.reqs[r as usize];
        let st = req.status;
        let bounce = req.bounce.take();
        let Some(mut io) = req.io.take() else { return };
        self.free_reqs.push(r);
        if let Some((first, pages)) = bounce {
            if let Some(pool) = self.bounce.as_mut() {
                if st.is_ok() && io.io_type == IoType::Read {
                    let (p, _) = pool.page(first);
                    let len = io.len as usize;
                    // SAFETY: the bounce pages hold `len` bytes the device has finished writing.
                    io.copy_in(0, unsafe { std::slice::from_raw_parts(p, len) });
                }
                pool.free(first, pages);
            }
        }
        io.status = st;
        self.done.push(io);
    }

    /// Moves the finished requests (status set) into `out`; the caller completes
    /// them with `io.complete(io.status)` outside any borrow of the queue pair.
    #[inline]
    pub fn take_done(&mut self, out: &mut Vec<Box<BdevIo>>) {
        self.inflight -= self.done.len();
        out.append(&mut self.done);
    }

    /// Scans outstanding commands for timeouts (at most every 1/8 of the timeout).
    pub fn check_timeouts(&mut self, now: u64, out: &mut Vec<TimeoutAction>) {
        if self.timeout_ticks == 0 || now < self.next_timeout_check || self.inflight == 0 {
            return;
        }
        self.next_timeout_check = now + (self.timeout_ticks / 8).max(1);
        for (cid, t) in self.trackers.iter_mut().enumerate() {
            if !matches!(t.target, Target::Req(_)) {
                continue;
            }
            if t.abort_tick == 0 {
                if now.saturating_sub(t.submit_tick) > self.timeout_ticks {
                    tracing::warn!(qid = self.qid, cid, "command timed out: aborting it");
                    t.abort_tick = now.max(1);
                    out.push(TimeoutAction::Abort {
                        sqid: self.qid,
                        cid: cid as u16,
                    });
                }
            } else if now.saturating_sub(t.abort_tick) > self.timeout_ticks {
                tracing::warn!(
                    qid = self.qid,
                    cid,
                    "aborted command still outstanding: controller reset needed"
                );
                out.push(TimeoutAction::Reset);
                return;
            }
        }
    }

    /// After the controller stopped (disabled or reset): takes every request
    /// still outstanding at the device back into `out` (with its namespace, for a
    /// retry or to fail it), frees every slot and clears the rings so the queues
    /// can be created again at the same addresses. Requests that had already
    /// finished stay for [`QueuePair::take_done`].
    pub fn reset_rings(&mut self, out: &mut Vec<(Box<BdevIo>, NsParams)>) {
        for t in self.trackers.iter_mut() {
            t.target = Target::Free;
            t.cqe = None;
        }
        self.free_cids = (0..self.trackers.len() as u16).rev().collect();
        for r in 0..self.reqs.len() {
            let req = &mut self.reqs[r];
            if let Some(io) = req.io.take() {
                if let (Some((first, pages)), Some(pool)) =
                    (req.bounce.take(), self.bounce.as_mut())
                {
                    pool.free(first, pages);
                }
                out.push((io, req.ns));
            }
        }
        self.free_reqs = (0..self.reqs.len() as u32).rev().collect();
        self.inflight = self.done.len();
        self.clear_rings();
    }
}

/// Builds the admin commands the controller layer sends.
pub mod build {
    use super::*;
    use spec::admin;

    /// Identify with `cns` for `nsid` into the page at `iova`.
    pub fn identify(cns: u32, nsid: u32, iova: u64) -> Command {
        Command {
            opc: admin::IDENTIFY,
            nsid,
            prp1: iova,
            cdw10: cns,
            ..Default::default()
        }
    }
    /// Set Features: Number of Queues (`n` submission and completion queues).
    pub fn set_num_queues(n: u16) -> Command {
        let v = (n as u32 - 1) << 16 | (n as u32 - 1);
        Command {
            opc: admin::SET_FEATURES,
            cdw10: admin::FEAT_NUM_QUEUES,
            cdw11: v,
            ..Default::default()
        }
    }
    /// Create I/O Completion Queue (physically contiguous, interrupts off).
    pub fn create_cq(qid: u16, entries: u16, iova: u64) -> Command {
        Command {
            opc: admin::CREATE_CQ,
            prp1: iova,
            cdw10: (entries as u32 - 1) << 16 | qid as u32,
            cdw11: 1,
            ..Default::default()
        }
    }
    /// Create I/O Submission Queue bound to completion queue `qid`.
    pub fn create_sq(qid: u16, entries: u16, iova: u64) -> Command {
        Command {
            opc: admin::CREATE_SQ,
            prp1: iova,
            cdw10: (entries as u32 - 1) << 16 | qid as u32,
            cdw11: (qid as u32) << 16 | 1,
            ..Default::default()
        }
    }
    /// Delete I/O Submission Queue.
    pub fn delete_sq(qid: u16) -> Command {
        Command {
            opc: admin::DELETE_SQ,
            cdw10: qid as u32,
            ..Default::default()
        }
    }
    /// Delete I/O Completion Queue.
    pub fn delete_cq(qid: u16) -> Command {
        Command {
            opc: admin::DELETE_CQ,
            cdw10: qid as u32,
            ..Default::default()
        }
    }
    /// Abort command `cid` of submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Command {
        Command {
            opc: admin::ABORT,
            cdw10: (cid as u32) << 16 | sqid as u32,
            ..Default::default()
        }
    }
}

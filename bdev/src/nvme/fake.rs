//! A software NVMe controller in process memory, for tests and the
//! submit/complete microbenchmark: registers are plain memory, queues and data
//! are read and written by address (pair it with [`super::mem::IdentityDma`]).
//! It implements enable/disable/shutdown, the admin commands the driver sends,
//! read/write/flush/write zeroes/dataset management, and fault injection
//! (commands held without completion, aborts ignored).

use super::error::NvmeError;
use super::mem::DmaSpace;
use super::queue::{build, QueueConfig, QueuePair};
use super::regs::RegisterIo;
use super::spec::{self, admin, nvm, status, Command, Completion, PAGE_SIZE};
use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const REG_BYTES: usize = 0x2000;

/// The register file of the software controller.
pub struct FakeRegs {
    words: Vec<AtomicU32>,
}

impl FakeRegs {
    fn new() -> Self {
        Self {
            words: (0..REG_BYTES / 4).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl RegisterIo for FakeRegs {
    #[inline]
    fn read32(&self, off: usize) -> u32 {
        self.words
            .get(off / 4)
            .map_or(u32::MAX, |w| w.load(Ordering::Acquire))
    }
    #[inline]
    fn write32(&self, off: usize, v: u32) {
        if let Some(w) = self.words.get(off / 4) {
            w.store(v, Ordering::Release);
        }
    }
    fn len(&self) -> usize {
        REG_BYTES
    }
}

/// Fault injection switches, shared with the running controller.
#[derive(Default)]
pub struct FakeFaults {
    /// The next this-many I/O commands are fetched but never completed.
    pub hold_next: AtomicU32,
    /// Abort commands complete but do not abort anything.
    pub ignore_abort: AtomicBool,
    /// Controller resets (CC.EN going from 1 to 0) seen.
    pub resets: AtomicU32,
    /// I/O commands executed.
    pub io_commands: AtomicU64,
    /// Abort commands received.
    pub aborts: AtomicU32,
    /// While set, every I/O command executed is appended to `log`, in order.
    pub log_io: AtomicBool,
    /// The I/O commands executed while `log_io` was set.
    pub log: Mutex<Vec<LoggedCmd>>,
}

/// An I/O command as the controller executed it (see [`FakeFaults::log`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedCmd {
    /// Opcode (`spec::nvm::*`).
    pub opc: u8,
    /// Starting LBA (read, write, write zeroes).
    pub slba: u64,
    /// Number of blocks (read, write, write zeroes).
    pub nlb: u64,
    /// The Force Unit Access bit (CDW12 bit 30).
    pub fua: bool,
}

/// Shape of the software controller.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Blocks of each namespace (namespace ids 1..).
    pub namespaces: Vec<u64>,
    /// log2 of the block size.
    pub lba_shift: u32,
    /// MDTS (0: unlimited).
    pub mdts: u8,
    /// CAP.MQES + 1.
    pub max_entries: u16,
    /// I/O queue pairs granted.
    pub max_queues: u16,
    /// CAP.DSTRD.
    pub dstrd: u8,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            namespaces: vec![2048],
            lba_shift: 9,
            mdts: 5,
            max_entries: 1024,
            max_queues: 8,
            dstrd: 0,
        }
    }
}

#[derive(Clone, Copy)]
struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    cqid: u16,
}

#[derive(Clone, Copy)]
struct Cq {
    base: u64,
    entries: u16,
    tail: u16,
    phase: u16,
}

/// The software controller.
pub struct FakeNvme {
    regs: Arc<FakeRegs>,
    cfg: FakeConfig,
    faults: Arc<FakeFaults>,
    disks: Arc<Mutex<Vec<Vec<u8>>>>,
    enabled: bool,
    sqs: HashMap<u16, Sq>,
    cqs: HashMap<u16, Cq>,
    held: Vec<(u16, Command)>,
}

fn stride(cfg: &FakeConfig) -> usize {
    4 << cfg.dstrd
}

impl FakeNvme {
    /// A controller with `cfg`.
    ///
    /// # Safety
    /// The controller reads and writes process memory at every address the driver
    /// programs into it (queue bases, PRPs). The driver must hand it only valid,
    /// live memory: the case when it allocates through [`super::mem::IdentityDma`]
    /// and the controller is stopped before that memory is freed.
    pub unsafe fn new(cfg: FakeConfig) -> Self {
        let regs = Arc::new(FakeRegs::new());
        let cap: u64 =
            (cfg.max_entries as u64 - 1) | 1 << 16 | 10 << 24 | (cfg.dstrd as u64) << 32 | 1 << 37;
        regs.write64(spec::REG_CAP, cap);
        regs.write32(spec::REG_VS, 0x0001_0400);
        let bs = 1usize << cfg.lba_shift;
        let disks = cfg
            .namespaces
            .iter()
            .map(|&n| vec![0u8; n as usize * bs])
            .collect();
        Self {
            regs,
            cfg,
            faults: Arc::new(FakeFaults::default()),
            disks: Arc::new(Mutex::new(disks)),
            enabled: false,
            sqs: HashMap::new(),
            cqs: HashMap::new(),
            held: Vec::new(),
        }
    }

    /// The register file (hand it to the driver).
    pub fn regs(&self) -> Arc<FakeRegs> {
        self.regs.clone()
    }
    /// The fault switches.
    pub fn faults(&self) -> Arc<FakeFaults> {
        self.faults.clone()
    }
    /// The namespaces' contents.
    pub fn disks(&self) -> Arc<Mutex<Vec<Vec<u8>>>> {
        self.disks.clone()
    }

    /// Does everything pending: register changes, then every submission queue.
    /// Returns whether it did anything.
    pub fn step(&mut self) -> bool {
        let cc = self.regs.read32(spec::REG_CC);
        let mut busy = false;
        if cc & spec::CC_SHN_MASK != 0
            && self.regs.read32(spec::REG_CSTS) & spec::CSTS_SHST_MASK == 0
        {
            self.stop();
            let csts = self.regs.read32(spec::REG_CSTS);
            self.regs
                .write32(spec::REG_CSTS, csts | spec::CSTS_SHST_COMPLETE);
            return true;
        }
        if cc & spec::CC_EN != 0 && !self.enabled && cc & spec::CC_SHN_MASK == 0 {
            self.start();
            return true;
        }
        let csts = self.regs.read32(spec::REG_CSTS);
        if cc & spec::CC_EN == 0 && (self.enabled || csts & spec::CSTS_RDY != 0) {
            if self.enabled {
                self.stop();
                self.faults.resets.fetch_add(1, Ordering::Relaxed);
            }
            // Disabling clears RDY; a completed shutdown stays visible.
            self.regs
                .write32(spec::REG_CSTS, csts & spec::CSTS_SHST_MASK);
            return true;
        }
        if !self.enabled {
            return false;
        }
        let qids: Vec<u16> = self.sqs.keys().copied().collect();
        for qid in qids {
            let tail = self
                .regs
                .read32(spec::doorbell_offset(qid, false, stride(&self.cfg)))
                as u16;
            while let Some(sq) = self.sqs.get(&qid).copied() {
                if sq.head == tail || tail >= sq.entries {
                    break;
                }
                // SAFETY: the queue base and head were given by the driver (see `new`).
                let cmd = unsafe {
                    (sq.base as *const Command)
                        .add(sq.head as usize)
                        .read_volatile()
                };
                if let Some(s) = self.sqs.get_mut(&qid) {
                    s.head = (sq.head + 1) % sq.entries;
                }
                busy = true;
                self.execute(qid, sq.cqid, cmd);
            }
        }
        busy
    }

    fn start(&mut self) {
        let aqa = self.regs.read32(spec::REG_AQA);
        let asq = self.regs.read64(spec::REG_ASQ);
        let acq = self.regs.read64(spec::REG_ACQ);
        self.sqs.insert(
            0,
            Sq {
                base: asq,
                entries: (aqa & 0xfff) as u16 + 1,
                head: 0,
                cqid: 0,
            },
        );
        self.cqs.insert(
            0,
            Cq {
                base: acq,
                entries: ((aqa >> 16) & 0xfff) as u16 + 1,
                tail: 0,
                phase: 1,
            },
        );
        self.enabled = true;
        self.regs.write32(spec::REG_CSTS, spec::CSTS_RDY);
    }

    fn stop(&mut self) {
        self.enabled = false;
        self.sqs.clear();
        self.cqs.clear();
        self.held.clear();
        for q in 0..=self.cfg.max_queues {
            self.regs
                .write32(spec::doorbell_offset(q, false, stride(&self.cfg)), 0);
            self.regs
                .write32(spec::doorbell_offset(q, true, stride(&self.cfg)), 0);
        }
    }

    fn post(&mut self, sqid: u16, cqid: u16, cid: u16, sc: u16, dw0: u32) {
        let head = self.sqs.get(&sqid).map_or(0, |s| s.head);
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        let slot = (cq.base as *mut Completion).wrapping_add(cq.tail as usize);
        let cqe = Completion {
            dw0,
            dw1: 0,
            sq_head: head,
            sq_id: sqid,
            cid,
            status: 0,
        };
        // SAFETY: the completion ring was given by the driver (see `new`); the entry
        // is written before its status word, which carries the phase bit.
        unsafe {
            let words = slot as *mut u32;
            words.write_volatile(cqe.dw0);
            words.add(1).write_volatile(0);
            words
                .add(2)
                .write_volatile(head as u32 | (sqid as u32) << 16);
            (slot as *mut u16).add(6).write_volatile(cid);
            fence(Ordering::Release);
            (slot as *mut u16).add(7).write_volatile(sc << 1 | cq.phase);
        }
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase ^= 1;
        }
    }

    fn write_page(iova: u64, data: &[u8]) {
        // SAFETY: the destination is a driver-provided page (see `new`).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), iova as *mut u8, data.len().min(PAGE_SIZE))
        };
    }

    fn execute(&mut self, sqid: u16, cqid: u16, cmd: Command) {
        if sqid == 0 {
            let (sc, dw0) = self.admin(cmd);
            self.post(0, 0, cmd.cid, sc, dw0);
            return;
        }
        self.faults.io_commands.fetch_add(1, Ordering::Relaxed);
        let hold = self.faults.hold_next.load(Ordering::Relaxed);
        if hold > 0
            && self
                .faults
                .hold_next
                .compare_exchange(hold, hold - 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.held.push((sqid, cmd));
            return;
        }
        if self.faults.log_io.load(Ordering::Relaxed) {
            let cmd_log = LoggedCmd {
                opc: cmd.opc,
                slba: cmd.cdw10 as u64 | (cmd.cdw11 as u64) << 32,
                nlb: (cmd.cdw12 & 0xffff) as u64 + 1,
                fua: cmd.cdw12 & nvm::FUA != 0,
            };
            self.faults
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(cmd_log);
        }
        let sc = self.io(cmd);
        self.post(sqid, cqid, cmd.cid, sc, 0);
    }

    fn admin(&mut self, cmd: Command) -> (u16, u32) {
        match cmd.opc {
            admin::IDENTIFY => {
                let mut page = vec![0u8; PAGE_SIZE];
                match cmd.cdw10 & 0xff {
                    admin::CNS_CONTROLLER => {
                        page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        page[4..24].copy_from_slice(b"FAKE0001            ");
                        page[24..64]
                            .copy_from_slice(format!("{:<40}", "sluice software NVMe").as_bytes());
                        page[64..72].copy_from_slice(b"1.0     ");
                        page[77] = self.cfg.mdts;
                        page[516..520]
                            .copy_from_slice(&(self.cfg.namespaces.len() as u32).to_le_bytes());
                        page[520..522].copy_from_slice(&(1u16 << 2 | 1 << 3).to_le_bytes());
                        page[525] = 1;
                    }
                    admin::CNS_NAMESPACE => {
                        let Some(&n) = self.cfg.namespaces.get((cmd.nsid as usize).wrapping_sub(1))
                        else {
                            return (status::INVALID_NAMESPACE, 0);
                        };
                        page[0..8].copy_from_slice(&n.to_le_bytes());
                        page[8..16].copy_from_slice(&n.to_le_bytes());
                        page[25] = 0;
                        page[26] = 0;
                        page[128..132].copy_from_slice(&(self.cfg.lba_shift << 16).to_le_bytes());
                    }
                    admin::CNS_ACTIVE_NS_LIST => {
                        let mut i = 0;
                        for id in 1..=self.cfg.namespaces.len() as u32 {
                            if id > cmd.nsid {
                                page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                                i += 1;
                            }
                        }
                    }
                    _ => return (status::INVALID_FIELD, 0),
                }
                Self::write_page(cmd.prp1, &page);
                (status::SUCCESS, 0)
            }
            admin::SET_FEATURES if cmd.cdw10 & 0xff == admin::FEAT_NUM_QUEUES => {
                let want = (cmd.cdw11 & 0xffff) as u16 + 1;
                let n = want.min(self.cfg.max_queues) as u32 - 1;
                (status::SUCCESS, n << 16 | n)
            }
            admin::CREATE_CQ => {
                let qid = (cmd.cdw10 & 0xffff) as u16;
                let entries = (cmd.cdw10 >> 16) as u16 + 1;
                if qid == 0 || qid > self.cfg.max_queues || self.cqs.contains_key(&qid) {
                    return (status::INVALID_QUEUE_ID, 0);
                }
                if entries > self.cfg.max_entries {
                    return (status::INVALID_QUEUE_SIZE, 0);
                }
                self.cqs.insert(
                    qid,
                    Cq {
                        base: cmd.prp1,
                        entries,
                        tail: 0,
                        phase: 1,
                    },
                );
                (status::SUCCESS, 0)
            }
            admin::CREATE_SQ => {
                let qid = (cmd.cdw10 & 0xffff) as u16;
                let entries = (cmd.cdw10 >> 16) as u16 + 1;
                let cqid = (cmd.cdw11 >> 16) as u16;
                if qid == 0 || self.sqs.contains_key(&qid) || !self.cqs.contains_key(&cqid) {
                    return (status::INVALID_QUEUE_ID, 0);
                }
                self.sqs.insert(
                    qid,
                    Sq {
                        base: cmd.prp1,
                        entries,
                        head: 0,
                        cqid,
                    },
                );
                (status::SUCCESS, 0)
            }
            admin::DELETE_SQ => {
                let qid = (cmd.cdw10 & 0xffff) as u16;
                let held: Vec<_> = self
                    .held
                    .iter()
                    .filter(|(q, _)| *q == qid)
                    .copied()
                    .collect();
                self.held.retain(|(q, _)| *q != qid);
                if let Some(sq) = self.sqs.get(&qid).copied() {
                    for (_, c) in held {
                        self.post(qid, sq.cqid, c.cid, status::ABORTED_SQ_DELETION, 0);
                    }
                }
                match self.sqs.remove(&qid) {
                    Some(_) => (status::SUCCESS, 0),
                    None => (status::INVALID_QUEUE_ID, 0),
                }
            }
            admin::DELETE_CQ => match self.cqs.remove(&((cmd.cdw10 & 0xffff) as u16)) {
                Some(_) => (status::SUCCESS, 0),
                None => (status::INVALID_QUEUE_ID, 0),
            },
            admin::ABORT => {
                self.faults.aborts.fetch_add(1, Ordering::Relaxed);
                let sqid = (cmd.cdw10 & 0xffff) as u16;
                let cid = (cmd.cdw10 >> 16) as u16;
                if self.faults.ignore_abort.load(Ordering::Relaxed) {
                    return (status::SUCCESS, 1);
                }
                if let Some(i) = self
                    .held
                    .iter()
                    .position(|(q, c)| *q == sqid && c.cid == cid)
                {
                    let (_, c) = self.held.remove(i);
                    if let Some(sq) = self.sqs.get(&sqid).copied() {
                        self.post(sqid, sq.cqid, c.cid, status::ABORTED_BY_REQUEST, 0);
                    }
                    return (status::SUCCESS, 0);
                }
                (status::SUCCESS, 1)
            }
            _ => (status::INVALID_OPCODE, 0),
        }
    }

    /// The PRP page addresses of a transfer of `len` bytes.
    fn prp_pages(cmd: &Command, len: usize) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        let first = (PAGE_SIZE - (cmd.prp1 as usize % PAGE_SIZE)).min(len);
        out.push((cmd.prp1, first));
        let mut rest = len - first;
        if rest == 0 {
            return out;
        }
        if rest <= PAGE_SIZE {
            out.push((cmd.prp2, rest));
            return out;
        }
        let list = cmd.prp2 as *const u64;
        let mut i = 0;
        while rest > 0 {
            // SAFETY: the PRP list was given by the driver (see `new`).
            let a = unsafe { list.add(i).read_volatile() };
            let n = rest.min(PAGE_SIZE);
            out.push((a, n));
            rest -= n;
            i += 1;
        }
        out
    }

    fn io(&mut self, cmd: Command) -> u16 {
        let shift = self.cfg.lba_shift;
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        let Some(disk) = disks.get_mut((cmd.nsid as usize).wrapping_sub(1)) else {
            return status::INVALID_NAMESPACE;
        };
        let nsze = (disk.len() >> shift) as u64;
        let slba = cmd.cdw10 as u64 | (cmd.cdw11 as u64) << 32;
        let nlb = (cmd.cdw12 & 0xffff) as u64 + 1;
        match cmd.opc {
            nvm::FLUSH => status::SUCCESS,
            nvm::READ | nvm::WRITE => {
                if slba + nlb > nsze {
                    return status::LBA_OUT_OF_RANGE;
                }
                let len = (nlb << shift) as usize;
                if self.cfg.mdts != 0 && len > PAGE_SIZE << self.cfg.mdts {
                    return status::INVALID_FIELD;
                }
                let mut pos = (slba << shift) as usize;
                for (addr, n) in Self::prp_pages(&cmd, len) {
                    let range = pos..pos + n;
                    // SAFETY: the data pages were given by the driver (see `new`).
                    unsafe {
                        if cmd.opc == nvm::READ {
                            std::ptr::copy_nonoverlapping(disk[range].as_ptr(), addr as *mut u8, n);
                        } else {
                            std::ptr::copy_nonoverlapping(
                                addr as *const u8,
                                disk[range].as_mut_ptr(),
                                n,
                            );
                        }
                    }
                    pos += n;
                }
                status::SUCCESS
            }
            nvm::WRITE_ZEROES => {
                if slba + nlb > nsze {
                    return status::LBA_OUT_OF_RANGE;
                }
                disk[(slba << shift) as usize..((slba + nlb) << shift) as usize].fill(0);
                status::SUCCESS
            }
            nvm::DSM => {
                let nr = (cmd.cdw10 & 0xff) as usize + 1;
                let list = cmd.prp1 as *const u64;
                for i in 0..nr {
                    // SAFETY: the range list page was given by the driver (see `new`).
                    let (w0, lba) = unsafe {
                        (
                            list.add(2 * i).read_volatile(),
                            list.add(2 * i + 1).read_volatile(),
                        )
                    };
                    let n = w0 >> 32;
                    if lba + n > nsze {
                        return status::LBA_OUT_OF_RANGE;
                    }
                    disk[(lba << shift) as usize..((lba + n) << shift) as usize].fill(0);
                }
                status::SUCCESS
            }
            _ => status::INVALID_OPCODE,
        }
    }

    /// Runs the controller on its own thread until the handle is stopped or dropped.
    pub fn spawn(mut self) -> FakeThread {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let regs = self.regs.clone();
        let faults = self.faults.clone();
        let disks = self.disks.clone();
        let thread = std::thread::Builder::new()
            .name("fake-nvme".into())
            .spawn(move || {
                let mut idle = 0u32;
                while !s.load(Ordering::Relaxed) {
                    if self.step() {
                        idle = 0;
                    } else {
                        idle += 1;
                        if idle > 1000 {
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
            })
            .ok();
        FakeThread {
            stop,
            thread,
            regs,
            faults,
            disks,
        }
    }
}

/// A software controller running on its own thread.
pub struct FakeThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    regs: Arc<FakeRegs>,
    faults: Arc<FakeFaults>,
    disks: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeThread {
    /// The register file.
    pub fn regs(&self) -> Arc<FakeRegs> {
        self.regs.clone()
    }
    /// The fault switches.
    pub fn faults(&self) -> Arc<FakeFaults> {
        self.faults.clone()
    }
    /// The namespaces' contents.
    pub fn disks(&self) -> Arc<Mutex<Vec<Vec<u8>>>> {
        self.disks.clone()
    }
    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Enables `fake` with an admin queue and creates I/O queue pair `cfg.qid`,
/// stepping the controller on the calling thread; returns the admin and the I/O
/// queue pair. For tests and benchmarks that drive a [`QueuePair`] directly.
pub fn inline_queue_pair(
    fake: &mut FakeNvme,
    dma: Arc<dyn DmaSpace>,
    cfg: QueueConfig,
) -> Result<(QueuePair, QueuePair), NvmeError> {
    let regs: Arc<dyn RegisterIo> = fake.regs();
    let acfg = QueueConfig {
        qid: 0,
        entries: 8,
        bounce_pages: 0,
        timeout_ticks: 0,
        ..cfg
    };
    let mut admin = QueuePair::new(acfg, regs.clone(), dma.clone())?;
    regs.write32(spec::REG_AQA, 7 << 16 | 7);
    regs.write64(spec::REG_ASQ, admin.sq_iova());
    regs.write64(spec::REG_ACQ, admin.cq_iova());
    regs.write32(
        spec::REG_CC,
        spec::CC_EN | spec::CC_IOSQES_64 | spec::CC_IOCQES_16,
    );
    fake.step();
    if regs.read32(spec::REG_CSTS) & spec::CSTS_RDY == 0 {
        return Err(NvmeError::Controller(
            "software controller did not become ready".into(),
        ));
    }
    let io = QueuePair::new(cfg, regs, dma)?;
    for cmd in [
        build::create_cq(cfg.qid, cfg.entries, io.cq_iova()),
        build::create_sq(cfg.qid, cfg.entries, io.sq_iova()),
    ] {
        let opc = cmd.opc;
        let cid = admin
            .submit_raw(cmd, 0)
            .map_err(|_| NvmeError::Controller("admin queue full".into()))?;
        admin.ring();
        fake.step();
        admin.process_completions(usize::MAX);
        let c = admin
            .take_raw(cid)
            .ok_or_else(|| NvmeError::Timeout("software controller did not answer".into()))?;
        if !c.is_ok() {
            return Err(NvmeError::Command {
                opc,
                status: c.status_code(),
            });
        }
    }
    Ok((admin, io))
}

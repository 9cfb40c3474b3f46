//! The controller: enable and reset (CC/CSTS within CAP.TO), the admin queue,
//! Identify, Set Features, creation of one I/O queue pair per reactor, command
//! timeouts (abort, then reset with the queues rebuilt and in-flight I/O
//! retried), and detach (queues deleted, normal shutdown, controller disabled).

use super::error::NvmeError;
use super::host;
use super::identify::{active_ns_list, CtrlrData, NsData};
use super::mem::{DmaRegion, DmaSpace};
use super::queue::{build, NsParams, QueueConfig, QueuePair, MAX_XFER_LIMIT};
use super::regs::RegisterIo;
use super::spec::{self, Cap, Command, Completion, PAGE_SIZE};
use reactor::RuntimeHandle;
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tunables of a controller.
#[derive(Debug, Clone)]
pub struct CtrlrOpts {
    /// Entries of each I/O queue (capped by CAP.MQES).
    pub io_queue_entries: u16,
    /// Entries of the admin queue.
    pub admin_queue_entries: u16,
    /// I/O command timeout (zero: none); on expiry the command is aborted, and if
    /// the abort does not bring it back within another timeout, the controller is reset.
    pub io_timeout: Duration,
    /// Admin command timeout.
    pub admin_timeout: Duration,
    /// Bounce memory per queue pair in pages (for buffers the IOMMU does not map).
    pub bounce_pages: usize,
}

impl Default for CtrlrOpts {
    fn default() -> Self {
        Self {
            io_queue_entries: 256,
            admin_queue_entries: 32,
            io_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(10),
            bounce_pages: 2048,
        }
    }
}

/// A namespace the controller exposes as a bdev.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// Identify data.
    pub data: NsData,
    /// Parameters the queue pairs use.
    pub params: NsParams,
    /// Block size in bytes.
    pub block_size: u32,
}

/// Life-cycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CtrlrState {
    /// Serving I/O.
    Enabled = 0,
    /// Being reset.
    Resetting = 1,
    /// A reset failed: every I/O fails.
    Failed = 2,
    /// Detached.
    Detached = 3,
}

struct Admin {
    qp: QueuePair,
    page: DmaRegion,
}

struct IoQueueInfo {
    qid: u16,
    entries: u16,
    sq_iova: u64,
    cq_iova: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An attached NVMe controller.
pub struct Controller {
    id: u64,
    name: String,
    traddr: String,
    regs: Arc<dyn RegisterIo>,
    dma: Arc<dyn DmaSpace>,
    cap: Cap,
    opts: CtrlrOpts,
    admin: Mutex<Admin>,
    data: CtrlrData,
    namespaces: Vec<Namespace>,
    io_queues: Vec<IoQueueInfo>,
    max_xfer: usize,
    state: AtomicU8,
    reset_lock: Mutex<()>,
    reset_pending: AtomicBool,
    resets: AtomicU64,
    aborts: AtomicU64,
    rt: RuntimeHandle,
    _backend: Mutex<Option<Box<dyn Any + Send>>>,
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool, NvmeError>,
) -> Result<(), NvmeError> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if f()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(NvmeError::Timeout(format!(
                "{what} (waited {} ms)",
                timeout.as_millis()
            )));
        }
        spins += 1;
        if spins < 1000 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Controller {
    /// Brings up a controller through its registers and DMA space: reset, enable,
    /// identify, one I/O queue pair per reactor of `rt` (installed on each reactor).
    /// Blocks the calling thread, which must not be a reactor.
    pub fn init(
        name: &str,
        traddr: &str,
        regs: Arc<dyn RegisterIo>,
        dma: Arc<dyn DmaSpace>,
        rt: &RuntimeHandle,
        opts: CtrlrOpts,
        backend: Option<Box<dyn Any + Send>>,
    ) -> Result<Arc<Self>, NvmeError> {
        let cap = Cap::decode(regs.read64(spec::REG_CAP));
        if regs.read32(spec::REG_CSTS) == u32::MAX {
            return Err(NvmeError::Controller(
                "registers read all ones: device not responding".into(),
            ));
        }
        if !cap.nvm_css {
            return Err(NvmeError::Controller(
                "the NVM command set is not supported".into(),
            ));
        }
        if cap.mps_min > PAGE_SIZE {
            return Err(NvmeError::Controller(format!(
                "minimum page size {} is above 4096",
                cap.mps_min
            )));
        }
        let nq = rt.num_reactors();
        let last_db = spec::doorbell_offset(nq as u16, true, cap.doorbell_stride) + 4;
        if last_db > regs.len() {
            return Err(NvmeError::Controller(format!(
                "BAR0 of {} bytes too small for {nq} queue doorbells",
                regs.len()
            )));
        }
        let admin_entries = opts.admin_queue_entries.clamp(2, cap.mqes.min(4096) as u16);
        let admin_cfg = QueueConfig {
            qid: 0,
            entries: admin_entries,
            doorbell_stride: cap.doorbell_stride,
            max_xfer: PAGE_SIZE,
            bounce_pages: 0,
            timeout_ticks: 0,
        };
        let admin_qp = QueuePair::new(admin_cfg, regs.clone(), dma.clone())?;
        let page = DmaRegion::new(dma.clone(), PAGE_SIZE)?;
        let admin = Mutex::new(Admin { qp: admin_qp, page });
        disable(regs.as_ref(), &cap)?;
        {
            let a = admin.lock().unwrap_or_else(|p| p.into_inner());
            enable(regs.as_ref(), &cap, &a.qp)?;
        }
        let mut ctrl = Controller {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            traddr: traddr.to_string(),
            regs,
            dma,
            cap,
            admin,
            data: CtrlrData::parse(&[0; 4096]),
            namespaces: Vec::new(),
            io_queues: Vec::new(),
            max_xfer: MAX_XFER_LIMIT,
            state: AtomicU8::new(CtrlrState::Enabled as u8),
            reset_lock: Mutex::new(()),
            reset_pending: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            aborts: AtomicU64::new(0),
            rt: rt.clone(),
            _backend: Mutex::new(backend),
            opts,
        };
        let r = ctrl.identify_and_create_queues(nq);
        match r {
            Ok(qps) => {
                let ctrl = Arc::new(ctrl);
                host::install(&ctrl, qps)?;
                Ok(ctrl)
            }
            Err(e) => {
                let _ = disable(ctrl.regs.as_ref(), &ctrl.cap);
                Err(e)
            }
        }
    }

    fn identify_and_create_queues(&mut self, nq: usize) -> Result<Vec<QueuePair>, NvmeError> {
        let page = self.identify(spec::admin::CNS_CONTROLLER, 0)?;
        self.data = CtrlrData::parse(&page);
        let mdts_bytes = if self.data.mdts == 0 {
            usize::MAX
        } else {
            self.cap.mps_min << self.data.mdts.min(20)
        };
        self.max_xfer = mdts_bytes.min(MAX_XFER_LIMIT);
        tracing::info!(
            ctrlr = %self.name, traddr = %self.traddr, vid = format_args!("{:#06x}", self.data.vid), mn = %self.data.mn,
            sn = %self.data.sn, mqes = self.cap.mqes, dstrd = self.cap.doorbell_stride, max_xfer = self.max_xfer,
            "NVMe controller enabled"
        );
        let list = self.identify(spec::admin::CNS_ACTIVE_NS_LIST, 0)?;
        let ids = active_ns_list(&list);
        for nsid in ids {
            let page = self.identify(spec::admin::CNS_NAMESPACE, nsid)?;
            let d = NsData::parse(nsid, &page);
            let Some(fmt) = d.format() else {
                tracing::warn!(nsid, "namespace has an invalid LBA format index: skipped");
                continue;
            };
            if d.nsze == 0 {
                continue;
            }
            if fmt.ms != 0 || !(9..=16).contains(&fmt.lbads) {
                tracing::warn!(
                    nsid,
                    ms = fmt.ms,
                    lbads = fmt.lbads,
                    "namespace format with metadata or odd block size: skipped"
                );
                continue;
            }
            let max_zeroes_blocks = if self.data.supports_write_zeroes() {
                65536
            } else {
                0
            };
            self.namespaces.push(Namespace {
                params: NsParams {
                    nsid,
                    lba_shift: fmt.lbads as u32,
                    max_zeroes_blocks,
                },
                block_size: 1 << fmt.lbads,
                data: d,
            });
        }
        let granted = self.set_num_queues(nq)?;
        if granted < nq {
            return Err(NvmeError::Controller(format!(
                "controller grants {granted} I/O queue pairs, {nq} needed (one per reactor)"
            )));
        }
        let entries = self
            .opts
            .io_queue_entries
            .clamp(2, self.cap.mqes.min(65535) as u16);
        let timeout_ticks = (self.opts.io_timeout.as_nanos() * reactor::ticks_hz() as u128
            / 1_000_000_000)
            .min(u64::MAX as u128) as u64;
        let mut qps = Vec::with_capacity(nq);
        for i in 0..nq {
            let cfg = QueueConfig {
                qid: i as u16 + 1,
                entries,
                doorbell_stride: self.cap.doorbell_stride,
                max_xfer: self.max_xfer,
                bounce_pages: self.opts.bounce_pages,
                timeout_ticks,
            };
            let qp = QueuePair::new(cfg, self.regs.clone(), self.dma.clone())?;
            self.io_queues.push(IoQueueInfo {
                qid: cfg.qid,
                entries,
                sq_iova: qp.sq_iova(),
                cq_iova: qp.cq_iova(),
            });
            qps.push(qp);
        }
        self.create_io_queues()?;
        Ok(qps)
    }

    fn identify(&self, cns: u32, nsid: u32) -> Result<Box<[u8; 4096]>, NvmeError> {
        let mut a = self.lock_admin();
        let iova = a.page.iova();
        a.page.zero(0, PAGE_SIZE);
        exec(
            &mut a.qp,
            build::identify(cns, nsid, iova),
            self.opts.admin_timeout,
        )?;
        let mut out = Box::new([0u8; 4096]);
        // SAFETY: the identify page is PAGE_SIZE bytes, and the controller finished
        // writing it (the command completed); the admin lock is held.
        unsafe { std::ptr::copy_nonoverlapping(a.page.ptr(), out.as_mut_ptr(), PAGE_SIZE) };
        Ok(out)
    }

    fn set_num_queues(&self, n: usize) -> Result<usize, NvmeError> {
        let mut a = self.lock_admin();
        let c = exec(
            &mut a.qp,
            build::set_num_queues(n as u16),
            self.opts.admin_timeout,
        )?;
        let nsq = (c.dw0 & 0xffff) as usize + 1;
        let ncq = (c.dw0 >> 16) as usize + 1;
        Ok(nsq.min(ncq))
    }

    fn create_io_queues(&self) -> Result<(), NvmeError> {
        let mut a = self.lock_admin();
        for q in &self.io_queues {
            exec(
                &mut a.qp,
                build::create_cq(q.qid, q.entries, q.cq_iova),
                self.opts.admin_timeout,
            )?;
            exec(
                &mut a.qp,
                build::create_sq(q.qid, q.entries, q.sq_iova),
                self.opts.admin_timeout,
            )?;
        }
        Ok(())
    }

    fn lock_admin(&self) -> std::sync::MutexGuard<'_, Admin> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unique id of this controller in the process.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Name given at attach.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// PCI address (or another transport label).
    pub fn traddr(&self) -> &str {
        &self.traddr
    }
    /// Identify Controller data.
    pub fn data(&self) -> &CtrlrData {
        &self.data
    }
    /// Decoded CAP register.
    pub fn cap(&self) -> &Cap {
        &self.cap
    }
    /// The namespaces exposed as bdevs.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// Largest transfer of one command in bytes.
    pub fn max_xfer(&self) -> usize {
        self.max_xfer
    }
    /// The runtime the queue pairs live on.
    pub fn runtime(&self) -> &RuntimeHandle {
        &self.rt
    }
    /// Current state.
    pub fn state(&self) -> CtrlrState {
        match self.state.load(Ordering::Acquire) {
            0 => CtrlrState::Enabled,
            1 => CtrlrState::Resetting,
            2 => CtrlrState::Failed,
            _ => CtrlrState::Detached,
        }
    }
    fn set_state(&self, s: CtrlrState) {
        self.state.store(s as u8, Ordering::Release);
    }
    /// Resets done so far.
    pub fn reset_count(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
    /// Aborts sent so far.
    pub fn abort_count(&self) -> u64 {
        self.aborts.load(Ordering::Relaxed)
    }

    /// Sends an Abort for `cid` of `sqid` from a helper thread (called by a
    /// reactor that saw a command time out).
    pub(crate) fn request_abort(self: &Arc<Self>, sqid: u16, cid: u16) {
        let c = self.clone();
        let spawned = std::thread::Builder::new().name("nvme-abort".into()).spawn(move || {
            c.aborts.fetch_add(1, Ordering::Relaxed);
            let mut a = c.lock_admin();
            match exec(&mut a.qp, build::abort(sqid, cid), c.opts.admin_timeout) {
                Ok(cqe) if cqe.dw0 & 1 == 0 => tracing::info!(ctrlr = %c.name, sqid, cid, "command aborted"),
                Ok(_) => tracing::warn!(ctrlr = %c.name, sqid, cid, "controller did not abort the command"),
                Err(e) => tracing::warn!(ctrlr = %c.name, sqid, cid, "abort failed: {e}"),
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the abort thread: {e}");
        }
    }

    /// Resets the controller from a helper thread unless a reset is already pending.
    pub(crate) fn request_reset(self: &Arc<Self>) {
        if self.reset_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nvme-reset".into())
            .spawn(move || {
                if let Err(e) = c.reset() {
                    tracing::error!(ctrlr = %c.name, "controller reset failed: {e}");
                }
            });
        if let Err(e) = spawned {
            self.reset_pending.store(false, Ordering::Release);
            tracing::error!("cannot start the reset thread: {e}");
        }
    }

    fn on_all_reactors(&self, f: impl Fn(u64) + Send + Sync + Clone + 'static) {
        let id = self.id;
        for (i, r) in self
            .rt
            .broadcast(move || f(id))
            .block()
            .into_iter()
            .enumerate()
        {
            if let Err(e) = r {
                tracing::warn!(ctrlr = %self.name, reactor = i, "reactor unreachable: {e:?}");
            }
        }
    }

    /// Resets the controller: queue pairs stop submitting, the controller is
    /// disabled (no DMA after that), outstanding requests are taken back, the
    /// controller is enabled and the queues created again, then the requests are
    /// resubmitted. If the controller does not come back it is marked failed and
    /// every request fails with EIO. Blocks the calling (non-reactor) thread.
    pub fn reset(self: &Arc<Self>) -> Result<(), NvmeError> {
        let _g = self.reset_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.reset_pending.store(false, Ordering::Release);
        if self.state() == CtrlrState::Detached {
            return Err(NvmeError::Busy(self.name.clone()));
        }
        tracing::warn!(ctrlr = %self.name, "resetting controller");
        self.set_state(CtrlrState::Resetting);
        self.on_all_reactors(host::pause);
        let r = (|| {
            disable(self.regs.as_ref(), &self.cap)?;
            self.on_all_reactors(host::take_back);
            {
                let mut a = self.lock_admin();
                let mut none = Vec::new();
                a.qp.reset_rings(&mut none);
                enable(self.regs.as_ref(), &self.cap, &a.qp)?;
            }
            let granted = self.set_num_queues(self.io_queues.len())?;
            if granted < self.io_queues.len() {
                return Err(NvmeError::Controller(format!(
                    "controller grants only {granted} I/O queue pairs after reset"
                )));
            }
            self.create_io_queues()
        })();
        self.resets.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) => {
                self.set_state(CtrlrState::Enabled);
                self.on_all_reactors(host::resume);
                tracing::info!(ctrlr = %self.name, "controller reset complete");
                Ok(())
            }
            Err(e) => {
                self.set_state(CtrlrState::Failed);
                self.on_all_reactors(host::take_back);
                self.on_all_reactors(host::fail);
                Err(e)
            }
        }
    }

    /// Stops the controller so the kernel driver can take it back: queue pairs
    /// stop, I/O queues are deleted, a normal shutdown is requested and the
    /// controller disabled; outstanding requests fail with `Aborted`, and every
    /// reactor's queue pair is removed. Blocks the calling (non-reactor) thread.
    pub fn shutdown(self: &Arc<Self>) {
        let _g = self.reset_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.state() == CtrlrState::Detached {
            return;
        }
        self.set_state(CtrlrState::Detached);
        self.on_all_reactors(host::pause);
        {
            let mut a = self.lock_admin();
            let t = self.opts.admin_timeout.min(Duration::from_secs(2));
            for q in self.io_queues.iter().rev() {
                if let Err(e) = exec(&mut a.qp, build::delete_sq(q.qid), t)
                    .and_then(|_| exec(&mut a.qp, build::delete_cq(q.qid), t))
                {
                    tracing::warn!(ctrlr = %self.name, qid = q.qid, "deleting I/O queue failed: {e}");
                    break;
                }
            }
        }
        let cc = self.regs.read32(spec::REG_CC);
        self.regs.write32(
            spec::REG_CC,
            (cc & !spec::CC_SHN_MASK) | spec::CC_SHN_NORMAL,
        );
        let to = Duration::from_millis(self.cap.timeout_ms);
        if let Err(e) = wait_for("shutdown", to, || {
            Ok(self.regs.read32(spec::REG_CSTS) & spec::CSTS_SHST_MASK == spec::CSTS_SHST_COMPLETE)
        }) {
            tracing::warn!(ctrlr = %self.name, "{e}");
        }
        if let Err(e) = disable(self.regs.as_ref(), &self.cap) {
            tracing::warn!(ctrlr = %self.name, "{e}");
        }
        self.on_all_reactors(host::take_back);
        self.on_all_reactors(host::remove);
        // Release the device (VFIO file, BAR mapping, IOMMU group) now, even if
        // references to this controller linger: the kernel driver or a new attach
        // can take the device at once.
        drop(
            self._backend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        tracing::info!(ctrlr = %self.name, "controller detached");
    }
}

/// Runs one admin command to completion (the admin lock is held by the caller).
fn exec(qp: &mut QueuePair, cmd: Command, timeout: Duration) -> Result<Completion, NvmeError> {
    let opc = cmd.opc;
    let cid = qp
        .submit_raw(cmd, reactor::ticks())
        .map_err(|_| NvmeError::Controller("admin queue full".into()))?;
    qp.ring();
    let mut got = None;
    let r = wait_for(&format!("admin command {opc:#04x}"), timeout, || {
        qp.process_completions(usize::MAX);
        got = qp.take_raw(cid);
        Ok(got.is_some())
    });
    if let Err(e) = r {
        qp.forget_raw(cid);
        return Err(e);
    }
    let c = got.ok_or_else(|| NvmeError::Timeout(format!("admin command {opc:#04x}")))?;
    if !c.is_ok() {
        return Err(NvmeError::Command {
            opc,
            status: c.status_code() & 0x7ff,
        });
    }
    Ok(c)
}

/// CC.EN = 0 and wait for CSTS.RDY = 0.
fn disable(regs: &dyn RegisterIo, cap: &Cap) -> Result<(), NvmeError> {
    let cc = regs.read32(spec::REG_CC);
    if cc & spec::CC_EN != 0 {
        regs.write32(spec::REG_CC, cc & !spec::CC_EN);
    }
    wait_for(
        "controller disable (CSTS.RDY = 0)",
        Duration::from_millis(cap.timeout_ms),
        || {
            let csts = regs.read32(spec::REG_CSTS);
            if csts == u32::MAX {
                return Err(NvmeError::Controller(
                    "device disappeared (registers read all ones)".into(),
                ));
            }
            Ok(csts & spec::CSTS_RDY == 0)
        },
    )
}

/// Programs the admin queue, sets CC.EN = 1 and waits for CSTS.RDY = 1.
fn enable(regs: &dyn RegisterIo, cap: &Cap, admin: &QueuePair) -> Result<(), NvmeError> {
    let n = admin.entries() as u32 - 1;
    regs.write32(spec::REG_AQA, n << 16 | n);
    regs.write64(spec::REG_ASQ, admin.sq_iova());
    regs.write64(spec::REG_ACQ, admin.cq_iova());
    regs.write32(
        spec::REG_CC,
        spec::CC_EN | spec::CC_IOSQES_64 | spec::CC_IOCQES_16,
    );
    wait_for(
        "controller enable (CSTS.RDY = 1)",
        Duration::from_millis(cap.timeout_ms),
        || {
            let csts = regs.read32(spec::REG_CSTS);
            if csts == u32::MAX {
                return Err(NvmeError::Controller(
                    "device disappeared (registers read all ones)".into(),
                ));
            }
            if csts & spec::CSTS_CFS != 0 {
                return Err(NvmeError::Controller(
                    "controller fatal status (CSTS.CFS) while enabling".into(),
                ));
            }
            Ok(csts & spec::CSTS_RDY != 0)
        },
    )
}

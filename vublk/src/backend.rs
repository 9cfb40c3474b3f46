//! The vhost-user control messages of one connection, as the `vhost` crate's
//! `BackendReqHandler` hands them over (on the connection's control thread,
//! one at a time): features, the memory table, each ring's size, addresses,
//! base and eventfds, and the configuration space.
//!
//! A ring starts on a reactor once it has memory, addresses, a kick eventfd and
//! (where protocol features were negotiated) `SET_VRING_ENABLE(1)`; it stops at
//! `GET_VRING_BASE`, a disable, a new memory table (and restarts on the new one
//! where it ran), a reset and a disconnect. Stopping waits for its requests in
//! flight ([`crate::vring`]). A message the device cannot honour (an index out
//! of range, a ring outside memory, unknown features) is an error, which drops
//! the connection; the service and other connections go on.

use crate::blk;
use crate::memory::GuestMem;
use crate::vring::{self, DevShared, QueueCtl, QueueSetup};
use reactor::RuntimeHandle;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::*;
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandler};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// How long stopping a ring waits for its requests in flight.
const STOP_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Vring {
    size: u16,
    addr: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    running: Option<Arc<QueueCtl>>,
}

#[derive(Default)]
struct State {
    features: u64,
    protocol: u64,
    mem: Option<Arc<GuestMem>>,
    vrings: Vec<Vring>,
}

/// One connection's device.
pub struct BlkBackend {
    dev: Arc<DevShared>,
    rt: RuntimeHandle,
    first_reactor: usize,
    num_queues: u16,
    blk_size: u32,
    offered: u64,
    state: Mutex<State>,
}

fn bad(what: &'static str) -> Error {
    tracing::warn!(reason = what, "vhost-user-blk: refused message");
    Error::InvalidOperation(what)
}

impl BlkBackend {
    /// A device over `dev` with `num_queues` rings spread from `first_reactor` on.
    pub fn new(
        dev: Arc<DevShared>,
        rt: RuntimeHandle,
        first_reactor: usize,
        num_queues: u16,
        blk_size: u32,
    ) -> Self {
        let b = &dev.bdev;
        let offered = blk::device_features(
            dev.writable,
            b.io_type_supported(bdev::IoType::Unmap),
            b.io_type_supported(bdev::IoType::WriteZeroes),
        );
        let mut st = State::default();
        st.vrings.resize_with(num_queues as usize, Vring::default);
        Self {
            dev,
            rt,
            first_reactor,
            num_queues,
            blk_size,
            offered,
            state: Mutex::new(st),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ring(st: &mut State, index: u32) -> Result<&mut Vring> {
        st.vrings
            .get_mut(index as usize)
            .ok_or_else(|| bad("queue index out of range"))
    }

    /// Stops every ring (a disconnect, a reset).
    pub fn stop_all(&self) {
        let mut st = self.lock();
        for v in &mut st.vrings {
            Self::stop(v);
        }
    }

    /// Stops `v` if it runs, keeping its next avail index as its base.
    fn stop(v: &mut Vring) {
        let Some(ctl) = v.running.take() else {
            return;
        };
        ctl.stop.store(true, Ordering::Release);
        // Wake the ring's reactor if it is parked: the kick is in its wake set.
        if let Some(k) = &v.kick {
            let _ = (&*k).write(&1u64.to_ne_bytes());
        }
        let t0 = Instant::now();
        while !ctl.done.load(Ordering::Acquire) {
            if t0.elapsed() > STOP_WAIT {
                tracing::error!("vhost-user-blk: a ring did not stop in time");
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        v.base = ctl.next_avail.load(Ordering::Acquire);
    }

    /// Starts ring `i` if it has everything it needs.
    fn maybe_start(&self, st: &mut State, i: usize) -> Result<()> {
        let protocol = st.features & blk::feature::PROTOCOL_FEATURES != 0;
        let event_idx = st.features & blk::feature::RING_EVENT_IDX != 0;
        let Some(mem) = st.mem.clone() else {
            return Ok(());
        };
        let v = &mut st.vrings[i];
        if v.running.is_some() || v.kick.is_none() || (protocol && !v.enabled) {
            return Ok(());
        }
        let Some((d, u, a)) = v.addr else {
            return Ok(());
        };
        let n = u64::from(v.size);
        let gpa = |uva, len| {
            mem.uva_to_gpa(uva, len)
                .ok_or_else(|| bad("ring outside memory"))
        };
        let (d, a, u) = (gpa(d, 16 * n)?, gpa(a, 6 + 2 * n)?, gpa(u, 6 + 8 * n)?);
        let mut q = Queue::new(blk::MAX_QUEUE_SIZE).map_err(|_| bad("queue"))?;
        q.try_set_size(v.size).map_err(|_| bad("bad queue size"))?;
        q.try_set_desc_table_address(GuestAddress(d))
            .map_err(|_| bad("misaligned descriptor table"))?;
        q.try_set_avail_ring_address(GuestAddress(a))
            .map_err(|_| bad("misaligned avail ring"))?;
        q.try_set_used_ring_address(GuestAddress(u))
            .map_err(|_| bad("misaligned used ring"))?;
        q.set_next_avail(v.base);
        q.set_next_used(v.base);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&mem.mem) {
            return Err(bad("ring outside memory"));
        }
        let clone = |f: &Option<File>| f.as_ref().map(|f| f.try_clone()).transpose();
        let kick = clone(&v.kick).map_err(Error::ReqHandlerError)?;
        let call = clone(&v.call).map_err(Error::ReqHandlerError)?;
        let Some(kick) = kick else {
            return Ok(());
        };
        let ctl = Arc::new(QueueCtl::default());
        let setup = QueueSetup {
            queue: q,
            mem,
            kick,
            call,
            dev: self.dev.clone(),
            ctl: ctl.clone(),
            index: i as u16,
        };
        let r = (self.first_reactor + i) % self.rt.num_reactors().max(1);
        match self.rt.call_on(r, move || vring::start(setup)).block() {
            Ok(Ok(())) => {
                tracing::debug!(queue = i, reactor = r, "vhost-user-blk: ring started");
                v.running = Some(ctl);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(queue = i, error = %e, "vhost-user-blk: ring did not start");
                Err(bad("ring did not start"))
            }
            Err(_) => Err(bad("the service is stopping")),
        }
    }
}

impl VhostUserBackendReqHandler for BlkBackend {
    fn set_owner(&self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&self) -> Result<()> {
        self.reset_device()
    }

    fn reset_device(&self) -> Result<()> {
        self.stop_all();
        let mut st = self.lock();
        let n = st.vrings.len();
        *st = State::default();
        st.vrings.resize_with(n, Vring::default);
        Ok(())
    }

    fn get_features(&self) -> Result<u64> {
        Ok(self.offered)
    }

    fn set_features(&self, features: u64) -> Result<()> {
        if features & !self.offered != 0 {
            return Err(bad("features not offered"));
        }
        self.lock().features = features;
        Ok(())
    }

    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        let mem = GuestMem::map(ctx, files).map_err(|e| {
            tracing::warn!(error = %e, "vhost-user-blk: memory table refused");
            Error::InvalidParam
        })?;
        let mut st = self.lock();
        let mut restart = Vec::new();
        for (i, v) in st.vrings.iter_mut().enumerate() {
            if v.running.is_some() {
                Self::stop(v);
                restart.push(i);
            }
        }
        st.mem = Some(Arc::new(mem));
        for i in restart {
            self.maybe_start(&mut st, i)?;
        }
        Ok(None)
    }

    fn set_vring_num(&self, index: u32, num: u32) -> Result<()> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, index)?;
        if num == 0 || num > u32::from(blk::MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(bad("bad queue size"));
        }
        if v.running.is_some() {
            return Err(bad("queue size of a running ring"));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, index)?;
        if v.running.is_some() {
            return Err(bad("addresses of a running ring"));
        }
        v.addr = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&self, index: u32, base: u32) -> Result<()> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, index)?;
        if v.running.is_some() {
            return Err(bad("base of a running ring"));
        }
        v.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&self, index: u32) -> Result<VhostUserVringState> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, index)?;
        Self::stop(v);
        v.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> Result<()> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, u32::from(index))?;
        Self::stop(v);
        let Some(fd) = fd else {
            return Err(bad("polling mode without a kick eventfd is not supported"));
        };
        set_nonblocking(&fd)?;
        v.kick = Some(fd);
        self.maybe_start(&mut st, index as usize)
    }

    fn set_vring_call(&self, index: u8, fd: Option<File>) -> Result<()> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, u32::from(index))?;
        let running = v.running.is_some();
        Self::stop(v);
        v.call = fd;
        if running {
            self.maybe_start(&mut st, index as usize)?;
        }
        Ok(())
    }

    fn set_vring_err(&self, index: u8, _fd: Option<File>) -> Result<()> {
        let mut st = self.lock();
        Self::ring(&mut st, u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
    }

    fn set_protocol_features(&self, features: u64) -> Result<()> {
        self.lock().protocol = features;
        Ok(())
    }

    fn get_queue_num(&self) -> Result<u64> {
        Ok(u64::from(self.num_queues))
    }

    fn set_vring_enable(&self, index: u32, enable: bool) -> Result<()> {
        let mut st = self.lock();
        let v = Self::ring(&mut st, index)?;
        v.enabled = enable;
        if enable {
            self.maybe_start(&mut st, index as usize)
        } else {
            Self::stop(v);
            Ok(())
        }
    }

    fn get_config(&self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> Result<Vec<u8>> {
        let (off, size) = (offset as usize, size as usize);
        if off + size > VHOST_USER_CONFIG_SIZE as usize {
            return Err(bad("config read out of range"));
        }
        let wb = self.dev.writeback.load(Ordering::Relaxed);
        let c = blk::config_space(self.dev.bdev.size(), self.blk_size, self.num_queues, wb);
        let mut out = vec![0u8; size];
        for (i, b) in out.iter_mut().enumerate() {
            *b = c.get(off + i).copied().unwrap_or(0);
        }
        Ok(out)
    }

    fn set_config(&self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // Only the cache mode is writable (CONFIG_WCE), as in QEMU's server.
        if offset as usize != blk::CONFIG_WRITEBACK || buf.len() != 1 || buf[0] > 1 {
            return Err(bad("only 'writeback' of the config space is writable"));
        }
        self.dev.writeback.store(buf[0] == 1, Ordering::Relaxed);
        Ok(())
    }

    fn set_backend_req_fd(&self, _backend: Backend) {}

    fn set_gpu_socket(&self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(bad("not a GPU"))
    }

    fn get_shared_object(&self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(bad("no shared objects"))
    }

    fn get_inflight_fd(&self, _inflight: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        Err(bad("inflight tracking not offered"))
    }

    fn set_inflight_fd(&self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        Err(bad("inflight tracking not offered"))
    }

    fn get_max_mem_slots(&self) -> Result<u64> {
        Err(bad("memory slots not offered"))
    }

    fn add_mem_region(
        &self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(bad("memory slots not offered"))
    }

    fn remove_mem_region(&self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(bad("memory slots not offered"))
    }

    fn set_device_state_fd(
        &self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(bad("device state transfer not offered"))
    }

    fn check_device_state(&self) -> Result<()> {
        Err(bad("device state transfer not offered"))
    }

    fn get_shmem_config(&self) -> Result<VhostUserShMemConfig> {
        Err(bad("no shared memory regions"))
    }

    fn set_log_base(&self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(bad("dirty logging not offered"))
    }
}

fn set_nonblocking(f: &File) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let io = |e: nix::Error| Error::ReqHandlerError(std::io::Error::from(e));
    let fl = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).map_err(io)?;
    let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(fl)).map_err(io)?;
    Ok(())
}

//! The `Device`: a named front door (QEMU's drive / block backend) whose root
//! node can be swapped live.
//!
//! Exports, `perf` jobs and clients open a device by name like any bdev. Each
//! reactor's channel forwards requests to that reactor's channel of the current
//! root. A swap (a snapshot moving the device onto a new overlay) *quiesces*:
//! new requests are parked, every reactor waits for its in-flight requests to
//! drain, the root is switched, and the parked requests are forwarded to the
//! new root. All of it is done with messages to the reactors; the data path
//! takes no lock and allocates nothing (a per-channel slot table keeps each
//! forwarded request's original tag and completion target).
//!
//! A job mirroring the device attaches a [`DirtyMap`] (every completed
//! write marks it) and, for QEMU's write-blocking copy mode, an
//! [`ActiveSync`]: while it is enabled a write goes on to the mirror's
//! target once the root has it and completes to its client after both
//! (`device/active.rs`).
//!
//! I/O limits ([`crate::throttle`]): a request to a device that the
//! registry's throttle table limits (by the device's name, QEMU's
//! `block_set_io_throttle`, or by its root's, SPDK's `bdev_set_qos_limit`
//! on a node exported through a hidden device) first reserves its place in
//! the group(s) and waits in this reactor's [`Gate`] until its time; with no
//! limits the data path checks one atomic.

use crate::bdev::{Bdev, Channel, RangeStatusFuture};
use crate::channel::{channel, IoChannel};
use crate::claim::{Claim, Holder};
use crate::deferred::complete_deferred;
use crate::error::BdevError;
use crate::io::{BdevIo, IoDone, IoStatus, IoType};
use crate::registry::Registry;
use crate::stats::IoStats;
use crate::throttle::{Gate, ThrottleGroup};
use reactor::RuntimeHandle;
use serde_json::{json, Value};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What is shared by every reactor's channel of one device.
struct Shared {
    id: u64,
    name: String,
    /// The registry the device's claims live in.
    nodes: Arc<Registry>,
    /// Who the device is in the claims it holds on its current root.
    holder: Holder,
    /// Not registered (an anonymous front door, such as an NBD export's).
    hidden: bool,
    /// Set (under the root lock) once the device let go of its root.
    closed: AtomicBool,
    root: Mutex<Arc<dyn Bdev>>,
    /// Bumped on every swap; channels compare it to refresh their root channel.
    gen: AtomicU64,
    /// Nesting depth of quiesce requests; > 0 parks new requests.
    paused: AtomicUsize,
    /// Number of watchers of client activity (the counters below only run while > 0).
    watchers: AtomicUsize,
    client_ops: AtomicU64,
    client_lat_ticks: AtomicU64,
    /// Dirty maps attached ([`Device::track_writes`]); `tracking` counts
    /// them so that the data path checks one atomic while there are none.
    tracking: AtomicUsize,
    dirty: Mutex<Vec<Arc<DirtyMap>>>,
    /// A write-blocking mirror ([`Device::sync_writes`]); `syncing` says
    /// whether one is attached so the data path checks one atomic.
    syncing: AtomicBool,
    active: Mutex<Option<Arc<ActiveSync>>>,
}

impl Shared {
    fn root(&self) -> Arc<dyn Bdev> {
        self.root.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets go of the root: releases the claim on it; a later swap releases
    /// the claim it took on its new root.
    fn close(&self) {
        let g = self.root.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        self.nodes.release(g.name(), &self.holder);
    }
}

/// While alive, writes through a device mark a [`DirtyMap`].
pub struct WriteTracking {
    shared: Arc<Shared>,
    map: Arc<DirtyMap>,
}

impl Drop for WriteTracking {
    fn drop(&mut self) {
        let mut v = self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = v.iter().position(|m| Arc::ptr_eq(m, &self.map)) {
            v.swap_remove(i);
            self.shared.tracking.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// While alive, writes through a device are mirrored synchronously onto an
/// [`ActiveSync`]'s target (when it is enabled).
pub struct SyncedWrites {
    shared: Arc<Shared>,
}

impl Drop for SyncedWrites {
    fn drop(&mut self) {
        let mut a = self.shared.active.lock().unwrap_or_else(|p| p.into_inner());
        *a = None;
        self.shared.syncing.store(false, Ordering::SeqCst);
    }
}

/// A named device over a swappable root node.
pub struct Device {
    shared: Arc<Shared>,
}

/// Client I/O counters of a device (see [`Device::watch_clients`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientActivity {
    /// Client requests completed.
    pub ops: u64,
    /// Sum of their latencies in reactor ticks.
    pub latency_ticks: u64,
}

/// While alive, the device counts client requests and their latency.
pub struct ClientWatch {
    shared: Arc<Shared>,
}

impl ClientWatch {
    /// Counters so far (monotonic; subtract two readings for an interval).
    pub fn activity(&self) -> ClientActivity {
        ClientActivity {
            ops: self.shared.client_ops.load(Ordering::Relaxed),
            latency_ticks: self.shared.client_lat_ticks.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ClientWatch {
    fn drop(&mut self) {
        self.shared.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Device {
    /// A device named `name` over `root`. The root is claimed in `nodes`
    /// (when registered there) for as long as it is the device's root.
    pub fn new(
        nodes: &Arc<Registry>,
        name: &str,
        root: Arc<dyn Bdev>,
    ) -> Result<Arc<Device>, BdevError> {
        if name.is_empty() {
            return Err(BdevError::InvalidParam(
                "device name must not be empty".into(),
            ));
        }
        Self::build(nodes, name, Holder::Device(name.to_string()), false, root)
    }

    /// An anonymous device over `root` (QEMU's BlockBackend of an export):
    /// not registered, so neither listed nor addressable by name, yet moved
    /// with its root by a snapshot (see [`Device::hidden_by_root`]). `claim`
    /// is the registry claim it holds on its current root (and its name in
    /// logs). Give it back with [`Device::close_hidden`].
    pub fn new_hidden(
        nodes: &Arc<Registry>,
        claim: &str,
        root: Arc<dyn Bdev>,
    ) -> Result<Arc<dyn Bdev>, BdevError> {
        if claim.is_empty() {
            return Err(BdevError::InvalidParam(
                "device claim must not be empty".into(),
            ));
        }
        let d: Arc<dyn Bdev> =
            Self::build(nodes, claim, Holder::Export(claim.to_string()), true, root)?;
        nodes.add_hidden(&d);
        Ok(d)
    }

    fn build(
        nodes: &Arc<Registry>,
        name: &str,
        holder: Holder,
        hidden: bool,
        root: Arc<dyn Bdev>,
    ) -> Result<Arc<Device>, BdevError> {
        if nodes.contains(root.name()) {
            nodes.claim(root.name(), Claim::root(holder.clone(), !root.read_only()))?;
        }
        Ok(Arc::new(Device {
            shared: Arc::new(Shared {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                name: name.to_string(),
                nodes: nodes.clone(),
                holder,
                hidden,
                closed: AtomicBool::new(false),
                root: Mutex::new(root),
                gen: AtomicU64::new(1),
                paused: AtomicUsize::new(0),
                watchers: AtomicUsize::new(0),
                client_ops: AtomicU64::new(0),
                client_lat_ticks: AtomicU64::new(0),
                tracking: AtomicUsize::new(0),
                dirty: Mutex::new(Vec::new()),
                syncing: AtomicBool::new(false),
                active: Mutex::new(None),
            }),
        }))
    }

    /// The device behind a bdev, if it is one.
    pub fn from_bdev(b: &Arc<dyn Bdev>) -> Option<&Device> {
        b.as_any().downcast_ref::<Device>()
    }

    /// The device registered in `nodes` whose current root is the bdev named `root`.
    pub fn find_by_root(nodes: &Registry, root: &str) -> Option<Arc<dyn Bdev>> {
        nodes
            .list()
            .into_iter()
            .find(|b| Device::from_bdev(b).is_some_and(|d| d.root().name() == root))
    }

    /// Every open hidden device whose current root is the bdev named `root`.
    pub fn hidden_by_root(nodes: &Registry, root: &str) -> Vec<Arc<dyn Bdev>> {
        nodes
            .hidden()
            .into_iter()
            .filter(|b| {
                Device::from_bdev(b).is_some_and(|d| {
                    !d.shared.closed.load(Ordering::SeqCst) && d.root().name() == root
                })
            })
            .collect()
    }

    /// Closes a hidden device made by [`Device::new_hidden`]: it lets go of
    /// its root and every reactor drops its cached channel to it (by
    /// messages: callable from any thread, a reactor's included). Requests
    /// must no longer be submitted to it.
    pub fn close_hidden(b: &Arc<dyn Bdev>, rt: &RuntimeHandle) {
        let Some(d) = Device::from_bdev(b) else {
            return;
        };
        d.shared.nodes.remove_hidden(b);
        d.shared.close();
        for i in 0..rt.num_reactors() {
            let b = b.clone();
            let _ = rt.send_completion(i, move || crate::channel::drop_cached_channels(&b));
        }
    }

    /// Whether this is a hidden device ([`Device::new_hidden`]).
    pub fn is_hidden(&self) -> bool {
        self.shared.hidden
    }

    /// The current root node.
    pub fn root(&self) -> Arc<dyn Bdev> {
        self.shared.root()
    }

    /// Starts counting client requests (for jobs that yield to clients).
    pub fn watch_clients(&self) -> ClientWatch {
        self.shared.watchers.fetch_add(1, Ordering::Relaxed);
        ClientWatch {
            shared: self.shared.clone(),
        }
    }

    /// Marks in `map` what every write through the device touches, from now
    /// until the guard is dropped (see [`DirtyMap`]).
    pub fn track_writes(&self, map: Arc<DirtyMap>) -> WriteTracking {
        let mut v = self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner());
        v.push(map.clone());
        self.shared.tracking.fetch_add(1, Ordering::SeqCst);
        WriteTracking {
            shared: self.shared.clone(),
            map,
        }
    }

    /// Writes through the device are written to `sync`'s target too before
    /// they complete, while `sync` is enabled, from now until the guard is
    /// dropped (see [`ActiveSync`]). One at a time: a second replaces the first.
    pub fn sync_writes(&self, sync: Arc<ActiveSync>) -> SyncedWrites {
        let mut a = self.shared.active.lock().unwrap_or_else(|p| p.into_inner());
        *a = Some(sync);
        self.shared.syncing.store(true, Ordering::SeqCst);
        SyncedWrites {
            shared: self.shared.clone(),
        }
    }

    /// Stops admitting requests and waits until no request is in flight on any
    /// reactor. New requests are parked until [`Device::resume`]. Nests.
    /// Callable from a reactor task or (with `block_on`) from any thread.
    pub async fn quiesce(&self, rt: &RuntimeHandle) -> Result<(), BdevError> {
        self.shared.paused.fetch_add(1, Ordering::SeqCst);
        let id = self.shared.id;
        let waits = rt.broadcast_spawn(move || async move {
            if let Some(l) = Local::lookup(id) {
                l.drained().await;
            }
        });
        let mut res = Ok(());
        for w in waits.await {
            if let Err(e) = w {
                res = Err(BdevError::Runtime(e.to_string()));
            }
        }
        if res.is_err() {
            self.resume(rt).await;
        }
        res
    }

    /// Ends one [`Device::quiesce`]; when none is left, parked requests are
    /// forwarded to the (possibly new) root.
    pub async fn resume(&self, rt: &RuntimeHandle) {
        let prev = self.shared.paused.fetch_sub(1, Ordering::SeqCst);
        if prev != 1 {
            return;
        }
        let id = self.shared.id;
        let _ = rt
            .broadcast(move || {
                if let Some(l) = Local::lookup(id) {
                    l.flush_parked();
                }
            })
            .await;
    }

    /// Moves the device onto `new_root` (same size) with no request lost or
    /// reordered across the switch; returns the old root. The new root is
    /// claimed and the old one released.
    pub async fn swap_root(
        &self,
        rt: &RuntimeHandle,
        new_root: Arc<dyn Bdev>,
    ) -> Result<Arc<dyn Bdev>, BdevError> {
        let cur = self.root();
        if new_root.size() != cur.size() || new_root.block_size() != cur.block_size() {
            return Err(BdevError::InvalidParam(format!(
                "new root {:?} has {} bytes in blocks of {}, the device has {} in blocks of {}",
                new_root.name(),
                new_root.size(),
                new_root.block_size(),
                cur.size(),
                cur.block_size()
            )));
        }
        let (nodes, holder) = (&self.shared.nodes, &self.shared.holder);
        if nodes.contains(new_root.name()) {
            nodes.claim(
                new_root.name(),
                Claim::root(holder.clone(), !new_root.read_only()),
            )?;
        }
        if let Err(e) = self.quiesce(rt).await {
            nodes.release(new_root.name(), holder);
            return Err(e);
        }
        let (old, closed) = {
            let mut g = self.shared.root.lock().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::replace(&mut *g, new_root.clone());
            (old, self.shared.closed.load(Ordering::SeqCst))
        };
        self.shared.gen.fetch_add(1, Ordering::SeqCst);
        self.resume(rt).await;
        // A device closed meanwhile has released its old root already.
        let release = if closed { &new_root } else { &old };
        nodes.release(release.name(), holder);
        tracing::info!(device = %self.shared.name, from = %old.name(), to = %new_root.name(), "device root switched");
        Ok(old)
    }
}

impl Bdev for Device {
    fn name(&self) -> &str {
        &self.shared.name
    }
    fn product_name(&self) -> &str {
        "Device"
    }
    fn block_size(&self) -> u32 {
        self.root().block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.root().num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.root().io_type_supported(t)
    }
    fn required_alignment(&self) -> u32 {
        self.root().required_alignment()
    }
    fn read_only(&self) -> bool {
        self.root().read_only()
    }
    fn uuid(&self) -> Option<String> {
        self.root().uuid()
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(DeviceChannel {
            local: Local::get_or_create(&self.shared),
        }))
    }
    fn driver_specific(&self) -> Value {
        json!({"device": {"root": self.root().name()}})
    }
    fn on_delete(&self) {
        self.shared.close();
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        self.root().range_status(offset, len)
    }
    /// A device over a qcow2 image is recreated by opening its top image (the
    /// chain below comes from the headers); other roots are not saved here.
    fn config(&self) -> Option<Value> {
        let root = self.root();
        let q = root.as_any().downcast_ref::<crate::qcow2::Qcow2Bdev>()?;
        let mut params = json!({ "name": self.name(), "node_name": root.name() });
        if root.read_only() {
            params["read_only"] = json!(true);
        }
        let oc = q.overlap_checks();
        if oc != crate::qcow2::OverlapChecks::default() {
            if let Some(m) = oc.mode() {
                params["overlap_check"] = json!(m);
            }
        }
        match q.filename() {
            Some(f) => {
                params["filename"] = json!(f.display().to_string());
                let base = q.base().config();
                let direct = base
                    .as_ref()
                    .and_then(|c| c["params"]["direct"].as_bool())
                    .unwrap_or(true);
                if !direct {
                    params["direct"] = json!(false);
                }
                if let Some(l) = base.as_ref().and_then(|c| c["params"].get("locking")) {
                    params["locking"] = l.clone();
                }
            }
            None => params["base_bdev"] = json!(q.base().name()),
        }
        // A backing node saved on its own (one over another bdev) is named:
        // the header's file would be opened a second time.
        if let Some(b) = q.backing().filter(|b| b.config().is_some()) {
            params["backing"] = json!(b.name());
        }
        Some(json!({ "method": "bdev_qcow2_open", "params": params }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What a forwarded request had before it was re-targeted.
struct Slot {
    tag: u64,
    done: Option<Rc<dyn IoDone>>,
    stats: Option<Rc<IoStats>>,
    submit_tick: u64,
    /// A write-blocking write: the mirror it also goes to.
    sync: Option<Arc<ActiveSync>>,
    /// Its source half is done; this completion is the target's.
    on_target: bool,
}

/// One reactor's state for one device.
struct Local {
    shared: Arc<Shared>,
    me: Weak<Local>,
    gen: Cell<u64>,
    root: RefCell<Option<Rc<IoChannel>>>,
    inflight: Cell<usize>,
    parked: RefCell<VecDeque<Box<BdevIo>>>,
    drained: RefCell<Option<Waker>>,
    slots: RefCell<Vec<Option<Slot>>>,
    free: RefCell<Vec<usize>>,
    flush_pending: Cell<bool>,
    /// This reactor's queue of requests waiting for their limits' time.
    gate: Rc<Gate>,
    /// The groups limiting the device, as of `limits_gen`.
    limits: RefCell<Vec<Arc<ThrottleGroup>>>,
    /// (throttle table generation, root generation) `limits` was read at.
    limits_gen: Cell<(u64, u64)>,
}

thread_local! {
    static LOCALS: RefCell<HashMap<u64, Weak<Local>>> = RefCell::new(HashMap::new());
}

impl Local {
    fn lookup(id: u64) -> Option<Rc<Local>> {
        LOCALS.with(|m| m.borrow().get(&id).and_then(Weak::upgrade))
    }

    fn get_or_create(shared: &Arc<Shared>) -> Rc<Local> {
        if let Some(l) = Self::lookup(shared.id) {
            return l;
        }
        let l = Rc::new_cyclic(|me| Local {
            shared: shared.clone(),
            me: me.clone(),
            gen: Cell::new(0),
            root: RefCell::new(None),
            inflight: Cell::new(0),
            parked: RefCell::new(VecDeque::new()),
            drained: RefCell::new(None),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            flush_pending: Cell::new(false),
            gate: {
                let me = me.clone();
                Gate::new(move |io| {
                    if let Some(l) = me.upgrade() {
                        l.released(io);
                    }
                })
            },
            limits: RefCell::new(Vec::new()),
            limits_gen: Cell::new((u64::MAX, u64::MAX)),
        });
        LOCALS.with(|m| m.borrow_mut().insert(shared.id, Rc::downgrade(&l)));
        l
    }

    fn paused(&self) -> bool {
        self.shared.paused.load(Ordering::Relaxed) > 0
    }

    /// The request if it may go now (with whether it was reserved in a
    /// group); else it waits in the gate.
    fn throttle(&self, io: Box<BdevIo>) -> Option<(Box<BdevIo>, bool)> {
        let t = self.shared.nodes.throttles();
        let now = (t.generation(), self.shared.gen.load(Ordering::Acquire));
        if now != self.limits_gen.get() {
            let mut v: Vec<Arc<ThrottleGroup>> = Vec::new();
            for n in [
                self.shared.name.clone(),
                self.shared.root().name().to_string(),
            ] {
                if let Some(g) = t.of(&n) {
                    if !v.iter().any(|x| Arc::ptr_eq(x, &g)) {
                        v.push(g);
                    }
                }
            }
            *self.limits.borrow_mut() = v;
            self.limits_gen.set(now);
        }
        let limits = self.limits.borrow();
        if limits.is_empty() {
            return Some((io, false));
        }
        self.gate.admit(io, &limits).map(|io| (io, true))
    }

    /// Parks the request or forwards it to the root; `Err(io)` when the
    /// root's queue is full.
    fn pass(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if self.paused() || !self.parked.borrow().is_empty() {
            self.parked.borrow_mut().push_back(io);
            if !self.paused() {
                self.wait_then_flush();
            }
            return Ok(());
        }
        self.forward(io)
    }

    /// A request the gate released: passed on, or parked when the root is full.
    fn released(&self, io: Box<BdevIo>) {
        if let Err(io) = self.pass(io) {
            self.parked.borrow_mut().push_back(io);
            self.wait_then_flush();
        }
    }

    /// This reactor's channel of the current root.
    fn root_channel(&self) -> Result<Rc<IoChannel>, BdevError> {
        let g = self.shared.gen.load(Ordering::Acquire);
        if g == self.gen.get() {
            if let Some(c) = self.root.borrow().as_ref() {
                return Ok(c.clone());
            }
        }
        let c = channel(&self.shared.root())?;
        *self.root.borrow_mut() = Some(c.clone());
        self.gen.set(g);
        Ok(c)
    }

    /// Forwards to the root; `Err(io)` (restored) when its queue is full.
    fn forward(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let ch = match self.root_channel() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(device = %self.shared.name, "no channel to the root: {e}");
                complete_deferred(io, IoStatus::Aborted);
                return Ok(());
            }
        };
        let sync = self.sync_for(&io);
        let slot = Slot {
            tag: io.tag,
            done: io.take_done(),
            stats: io.stats.take(),
            submit_tick: io.submit_tick,
            sync,
            on_target: false,
        };
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => {
                self.slots.borrow_mut()[i] = Some(slot);
                i
            }
            None => {
                let mut s = self.slots.borrow_mut();
                s.push(Some(slot));
                s.len() - 1
            }
        };
        io.tag = idx as u64;
        let me: Option<Rc<dyn IoDone>> = self.me.upgrade().map(|m| m as Rc<dyn IoDone>);
        io.set_done(me);
        match ch.submit(io) {
            Ok(()) => {
                self.inflight.set(self.inflight.get() + 1);
                Ok(())
            }
            Err(mut io) => {
                if let Some(s) = self.restore_sync(&io) {
                    s.release(io.offset, io.len);
                }
                self.restore(&mut io);
                Err(io)
            }
        }
    }

    /// The enabled write-blocking mirror a write is also for (its range
    /// then held busy), if any.
    fn sync_for(&self, io: &BdevIo) -> Option<Arc<ActiveSync>> {
        if !self.shared.syncing.load(Ordering::Acquire)
            || !matches!(io.io_type, IoType::Write | IoType::WriteZeroes)
        {
            return None;
        }
        let s = self
            .shared
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|s| s.enabled())?;
        s.acquire(io.offset, io.len);
        Some(s)
    }

    /// The mirror a forwarded request's slot holds (taken out).
    fn restore_sync(&self, io: &BdevIo) -> Option<Arc<ActiveSync>> {
        self.slots
            .borrow_mut()
            .get_mut(io.tag as usize)
            .and_then(Option::as_mut)
            .and_then(|s| s.sync.take())
    }

    /// A write-blocking write whose source half succeeded goes on to the
    /// target (keeping its slot, so it stays in flight); `Err(io)` when
    /// it is not one, or when it is done (both halves).
    fn to_target(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let idx = io.tag as usize;
        let (sync, on_target) = match self.slots.borrow_mut().get_mut(idx) {
            Some(Some(s)) if s.sync.is_some() => {
                let first = !s.on_target;
                s.on_target = true;
                (s.sync.clone(), !first)
            }
            _ => return Err(io),
        };
        let Some(sync) = sync else {
            return Err(io);
        };
        if on_target || !io.status.is_ok() {
            // Done, or the source half failed (nothing to mirror: marked
            // dirty all the same, the source may have changed in part).
            self.restore_sync(&io);
            sync.finish(io.offset, io.len, on_target && io.status.is_ok());
            if on_target {
                // The client's write succeeded on the source: a failed
                // target half is the job's to copy again, not the client's.
                io.status = IoStatus::Success;
            }
            return Err(io);
        }
        let ch = match channel(sync.target()) {
            Ok(c) => c,
            Err(_) => {
                self.restore_sync(&io);
                sync.finish(io.offset, io.len, false);
                return Err(io);
            }
        };
        match ch.submit(io) {
            Ok(()) => Ok(()),
            Err(io) => {
                // The target's queue is full: the job copies it instead.
                self.restore_sync(&io);
                sync.finish(io.offset, io.len, false);
                Err(io)
            }
        }
    }

    /// Puts back what [`Local::forward`] took out of the request.
    fn restore(&self, io: &mut BdevIo) -> Option<u64> {
        let idx = io.tag as usize;
        let slot = self
            .slots
            .borrow_mut()
            .get_mut(idx)
            .and_then(Option::take)?;
        self.free.borrow_mut().push(idx);
        io.tag = slot.tag;
        io.set_done(slot.done);
        io.stats = slot.stats;
        io.submit_tick = slot.submit_tick;
        Some(slot.submit_tick)
    }

    /// Forwards parked requests (after a resume, or when the root has room again).
    fn flush_parked(&self) {
        self.flush_pending.set(false);
        loop {
            if self.paused() {
                return;
            }
            let Some(io) = self.parked.borrow_mut().pop_front() else {
                return;
            };
            if let Err(io) = self.forward(io) {
                self.parked.borrow_mut().push_front(io);
                self.wait_then_flush();
                return;
            }
        }
    }

    fn wait_then_flush(&self) {
        if self.flush_pending.replace(true) {
            return;
        }
        let me = self.me.clone();
        let again = Box::new(move || {
            if let Some(l) = me.upgrade() {
                l.flush_parked();
            }
        });
        match self.root_channel() {
            Ok(c) => c.wait_for_space(again),
            Err(_) => {
                reactor::spawn_local(async move { again() });
            }
        }
    }

    /// Resolves when nothing is in flight on this reactor.
    async fn drained(self: Rc<Self>) {
        poll_fn(|cx| {
            if self.inflight.get() == 0 {
                Poll::Ready(())
            } else {
                *self.drained.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl IoDone for Local {
    fn io_done(&self, io: Box<BdevIo>) {
        let synced = matches!(
            self.slots.borrow().get(io.tag as usize),
            Some(Some(s)) if s.sync.is_some()
        );
        let mut io = if synced {
            match self.to_target(io) {
                Ok(()) => return,
                Err(io) => io,
            }
        } else {
            io
        };
        let Some(submit_tick) = self.restore(&mut io) else {
            tracing::error!(device = %self.shared.name, tag = io.tag, "completion of an unknown forwarded request");
            return;
        };
        self.inflight.set(self.inflight.get() - 1);
        if self.shared.watchers.load(Ordering::Relaxed) > 0 {
            self.shared.client_ops.fetch_add(1, Ordering::Relaxed);
            self.shared.client_lat_ticks.fetch_add(
                reactor::ticks().saturating_sub(submit_tick),
                Ordering::Relaxed,
            );
        }
        if !synced
            && self.shared.tracking.load(Ordering::Acquire) > 0
            && matches!(
                io.io_type,
                IoType::Write | IoType::WriteZeroes | IoType::Unmap
            )
        {
            let maps = self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner());
            for m in maps.iter() {
                m.mark(io.offset, io.len);
            }
        }
        let st = io.status;
        io.complete(st);
        if self.inflight.get() == 0 {
            if let Some(w) = self.drained.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let id = self.shared.id;
        // `try_with`: when the reactor thread exits, its channel table (and
        // with it this `Local`) may be dropped after `LOCALS` itself.
        let _ = LOCALS.try_with(|m| {
            if let Ok(mut m) = m.try_borrow_mut() {
                if m.get(&id).is_some_and(|w| w.strong_count() == 0) {
                    m.remove(&id);
                }
            }
        });
    }
}

/// The device's channel on one reactor.
struct DeviceChannel {
    local: Rc<Local>,
}

impl Channel for DeviceChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        match self.local.throttle(io) {
            Some((io, false)) => self.local.pass(io),
            // Reserved: never handed back (a retry would reserve again).
            Some((io, true)) => {
                self.local.released(io);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        match self.local.root_channel() {
            Ok(c) => c.wait_for_space(f),
            Err(_) => {
                reactor::spawn_local(async move { f() });
            }
        }
    }

    fn kick(&self) {
        if let Ok(c) = self.local.root_channel() {
            c.kick();
        }
    }
}

mod active;
mod dirty;
#[cfg(test)]
mod tests;

pub use active::ActiveSync;
pub use dirty::DirtyMap;

//! One io_uring per reactor, shared by every uring channel on it (SPDK's
//! `bdev_uring` group channel): one ring, one eventfd and one poller per
//! reactor however many files are open, where a ring (and eventfd) per
//! channel made each device cost file descriptors and ring memory.
//!
//! Ownership: every [`Chan`] holds the group (`Rc`); the reactor's
//! thread-local slot and the poller hold it weakly, so the ring lives while
//! any channel on the reactor does and goes with the last one (a later
//! channel makes a new one). A channel is a member under a key; an SQE's
//! user data is `key << 32 | slot` and its CQE is handed to that member's
//! [`Chan::finish`]. A channel waits for all its SQEs (requests and hints)
//! before it leaves, so a key never receives a CQE of an earlier member.
//!
//! `io_uring_enter` may take fewer SQEs than it is given (it stops at one it
//! cannot even start, whose error CQE it posts, or when it cannot allocate a
//! request): the ones it left stay queued, counted, and the poller, busy
//! while any are, hands them over at its next round. (Taking them all as
//! submitted left them in the SQ with nothing to submit them, and the
//! reactor free to park for good: no CQE can come for them.)
//!
//! Reaped CQEs wait in a queue on the group, taken one at a time, so a
//! completion that drops another channel (whose drop waits for its own
//! CQEs, possibly reaped already) finds them there.
//!
//! Bounds: a channel holds at most [`RING_ENTRIES`] requests; the group
//! holds at most as many SQEs in flight as its completion queue has entries
//! (so no CQE overflows), a channel refused for that reason is woken
//! ([`Group::starve`]) when CQEs are reaped. Files are registered in a
//! sparse table, a slot per channel while there are free ones (else the
//! channel uses its descriptor); the DMA arena's regions are registered as
//! fixed buffers as they appear. A slot holds an open file description of
//! its own of the channel's file (opened again through `/proc/self/fd`, same
//! access mode and O_DIRECT, its descriptor closed at once): the kernel
//! tears a ring down, and lets go of its table, only a while after the
//! process is gone, and the bdev's own description carries its image lock
//! ([`crate::lock`]), which must go with a killed process as QEMU's does.

use super::channel::{Chan, RING_ENTRIES};
use crate::dma;
use io_uring::{squeue, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};
use reactor::{register_poller, PollStatus, PollerHandle};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::{Rc, Weak};

/// SQ entries of a reactor's ring (the CQ has twice as many).
const SQ_ENTRIES: u32 = RING_ENTRIES * 8;

/// Registered file slots at most (fewer under a lower `RLIMIT_NOFILE`).
const MAX_FILES: u32 = 1 << 16;

/// Registered buffer slots (the arena's regions, added as they appear).
const MAX_BUFS: u32 = 64;

/// The slot part of the user data of hint SQEs, whose CQEs are not requests.
pub(crate) const HINT: u32 = u32::MAX;

thread_local! {
    /// This reactor's group, while any channel holds it.
    static CURRENT: RefCell<Weak<Group>> = const { RefCell::new(Weak::new()) };
}

pub(crate) struct Group {
    ring: RefCell<IoUring>,
    efd: EventFd,
    /// The group's poller, paused while nothing is queued or in flight and
    /// nobody waits for room ([`Group::park_if_idle`]); resumed by the next SQE.
    poller: RefCell<Option<PollerHandle>>,
    /// SQEs pushed but not yet handed to the kernel (after an enter, the
    /// ones it left in the SQ: see the module doc).
    unsubmitted: Cell<u32>,
    /// [`Group::poll`] is running (a kick from inside a completion waits).
    in_poll: Cell<bool>,
    /// SQEs pushed whose CQE is not taken from [`Group::reaped`] yet.
    in_flight: Cell<u32>,
    /// Most SQEs in flight: the CQ's size.
    cap: u32,
    /// Members by key (`None`: free key, on `free_keys`).
    members: RefCell<Vec<Option<Weak<Chan>>>>,
    free_keys: RefCell<Vec<u32>>,
    /// CQEs reaped and not yet handed to their channel: (user data, result).
    reaped: RefCell<VecDeque<(u64, i32)>>,
    /// Channels with waiters for room, woken after CQEs are reaped.
    starved: RefCell<Vec<Weak<Chan>>>,
    /// Free registered file slots (empty: none, or no table).
    free_files: RefCell<Vec<u32>>,
    /// Registered buffers: (start, len) by index.
    bufs: RefCell<Vec<(usize, usize)>>,
    /// Buffers are added one by one (a sparse table); else registered once.
    bufs_sparse: bool,
}

fn build_ring() -> std::io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(SQ_ENTRIES * 2)
        .setup_single_issuer()
        .setup_clamp();
    match b.build(SQ_ENTRIES) {
        Ok(r) => Ok(r),
        // Older kernels lack SINGLE_ISSUER; plain rings work everywhere.
        Err(_) => IoUring::builder()
            .setup_cqsize(SQ_ENTRIES * 2)
            .build(SQ_ENTRIES),
    }
}

/// Lets the ring's io-wq workers (which do buffered file I/O in the kernel) run on
/// the runtime's helper cores rather than inherit the reactor's pinning, where
/// they would queue behind its polling.
fn set_worker_affinity(ring: &IoUring) {
    let Some(rt) = reactor::handle() else { return };
    let cores = rt.helper_cores();
    if cores.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: `c` is below CPU_SETSIZE, so the bit lies inside `set`.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    if let Err(e) = ring.submitter().register_iowq_aff(&set) {
        tracing::debug!(error = %e, "io_uring: io-wq affinity not set");
    }
}

/// The soft `RLIMIT_NOFILE`, which bounds a registered file table.
fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// The arena's regions the kernel can take as fixed buffers (1 GiB at most each).
fn buffer_regions() -> Vec<(usize, usize)> {
    dma::regions()
        .into_iter()
        .filter(|&(_, len)| len <= 1 << 30)
        .collect()
}

fn iovecs(regions: &[(usize, usize)]) -> Vec<libc::iovec> {
    regions
        .iter()
        .map(|&(base, len)| libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        })
        .collect()
}

/// The ring's own open file description of the file behind `fd` (see the
/// module doc); its descriptor is the caller's to close once registered.
fn ring_copy(fd: RawFd) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let mode = fl & libc::O_ACCMODE;
    std::fs::OpenOptions::new()
        .read(mode != libc::O_WRONLY)
        .write(mode != libc::O_RDONLY)
        .custom_flags(libc::O_CLOEXEC | (fl & libc::O_DIRECT))
        .open(format!("/proc/self/fd/{fd}"))
}

impl Group {
    /// This reactor's group: the one its channels share, or a new one.
    pub(crate) fn current() -> std::io::Result<Rc<Group>> {
        if !reactor::is_reactor_thread() {
            return Err(std::io::Error::other(
                "uring channels are created on a reactor thread",
            ));
        }
        if let Some(g) = CURRENT.with(|c| c.borrow().upgrade()) {
            g.add_new_buffers();
            return Ok(g);
        }
        let g = Group::new()?;
        CURRENT.with(|c| *c.borrow_mut() = Rc::downgrade(&g));
        Ok(g)
    }

    fn new() -> std::io::Result<Rc<Group>> {
        let ring = build_ring()?;
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(efd.as_fd().as_raw_fd())?;
        set_worker_affinity(&ring);
        let nfiles = nofile_limit().min(MAX_FILES as u64) as u32;
        let free_files = match ring.submitter().register_files_sparse(nfiles) {
            Ok(()) => (0..nfiles).rev().collect(),
            Err(e) => {
                tracing::debug!(error = %e, "io_uring: registered files unavailable");
                Vec::new()
            }
        };
        let (bufs, bufs_sparse) = match ring.submitter().register_buffers_sparse(MAX_BUFS) {
            Ok(()) => (Vec::new(), true),
            Err(_) => {
                // Older kernels: the regions there are now, once.
                let regions = buffer_regions();
                let iovs = iovecs(&regions);
                // SAFETY: the arena's regions stay mapped for the life of the
                // process, so the kernel's pinned view of them never dangles.
                let ok = !iovs.is_empty()
                    && match unsafe { ring.submitter().register_buffers(&iovs) } {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "io_uring: registered buffers unavailable");
                            false
                        }
                    };
                (if ok { regions } else { Vec::new() }, false)
            }
        };
        let cap = ring.params().cq_entries();
        let g = Rc::new(Group {
            ring: RefCell::new(ring),
            efd,
            poller: RefCell::new(None),
            unsubmitted: Cell::new(0),
            in_poll: Cell::new(false),
            in_flight: Cell::new(0),
            cap,
            members: RefCell::new(Vec::new()),
            free_keys: RefCell::new(Vec::new()),
            reaped: RefCell::new(VecDeque::with_capacity(cap as usize)),
            starved: RefCell::new(Vec::new()),
            free_files: RefCell::new(free_files),
            bufs: RefCell::new(bufs),
            bufs_sparse,
        });
        g.add_new_buffers();
        reactor::register_fd(g.efd.as_fd().as_raw_fd())?;
        let weak = Rc::downgrade(&g);
        let poller = register_poller("bdev_uring", move || match weak.upgrade() {
            Some(g) => g.poll(),
            None => PollStatus::Idle,
        });
        *g.poller.borrow_mut() = Some(poller);
        tracing::debug!(sq = SQ_ENTRIES, cq = cap, "io_uring: reactor ring created");
        Ok(g)
    }

    /// Registers the arena's regions not registered yet (the arena grows).
    fn add_new_buffers(&self) {
        if !self.bufs_sparse {
            return;
        }
        let regions = buffer_regions();
        let mut bufs = self.bufs.borrow_mut();
        for r in regions {
            if bufs.contains(&r) || bufs.len() as u32 >= MAX_BUFS {
                continue;
            }
            let iov = iovecs(&[r]);
            // SAFETY: as in `new`: the region stays mapped for the life of the process.
            let res = unsafe {
                self.ring.borrow().submitter().register_buffers_update(
                    bufs.len() as u32,
                    &iov,
                    None,
                )
            };
            match res {
                Ok(()) => bufs.push(r),
                Err(e) => {
                    tracing::debug!(error = %e, "io_uring: buffer not registered");
                    return;
                }
            }
        }
    }

    /// Takes a key for `chan`.
    pub(crate) fn join(&self, chan: Weak<Chan>) -> u32 {
        let mut m = self.members.borrow_mut();
        match self.free_keys.borrow_mut().pop() {
            Some(k) => {
                m[k as usize] = Some(chan);
                k
            }
            None => {
                m.push(Some(chan));
                (m.len() - 1) as u32
            }
        }
    }

    /// Gives back `key` (its channel has nothing in flight).
    pub(crate) fn leave(&self, key: u32) {
        if let Some(m) = self.members.borrow_mut().get_mut(key as usize) {
            *m = None;
            self.free_keys.borrow_mut().push(key);
        }
    }

    /// Registers the file behind `fd` (a copy of it: see the module doc) in
    /// a free file slot; `None`: none free (or no table, or no copy).
    pub(crate) fn register_file(&self, fd: RawFd) -> Option<u32> {
        let copy = match ring_copy(fd) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "io_uring: file not registered");
                return None;
            }
        };
        let idx = self.free_files.borrow_mut().pop()?;
        match self
            .ring
            .borrow()
            .submitter()
            .register_files_update(idx, &[copy.as_raw_fd()])
        {
            Ok(_) => Some(idx),
            Err(e) => {
                tracing::debug!(error = %e, "io_uring: file not registered");
                self.free_files.borrow_mut().push(idx);
                None
            }
        }
    }

    /// Puts the open file now behind `fd` in slot `idx` (requests in flight
    /// keep the one they started with).
    pub(crate) fn update_file(&self, idx: u32, fd: RawFd) -> std::io::Result<()> {
        let copy = ring_copy(fd)?;
        self.ring
            .borrow()
            .submitter()
            .register_files_update(idx, &[copy.as_raw_fd()])
            .map(drop)
    }

    /// Empties slot `idx` (its channel has nothing queued) and frees it.
    pub(crate) fn unregister_file(&self, idx: u32) {
        if self
            .ring
            .borrow()
            .submitter()
            .register_files_update(idx, &[-1])
            .is_ok()
        {
            self.free_files.borrow_mut().push(idx);
        }
    }

    /// The registered buffer holding `[addr, addr + len)`, if any.
    pub(crate) fn fixed_buf(&self, addr: usize, len: usize) -> Option<u16> {
        self.bufs
            .borrow()
            .iter()
            .position(|&(b, l)| addr >= b && addr + len <= b + l)
            .map(|i| i as u16)
    }

    /// Whether another SQE may be queued (the CQ has room for its CQE).
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight.get() < self.cap
    }

    /// Queues an SQE (user data set) and wakes the poller.
    ///
    /// # Safety
    /// Whatever memory the SQE names stays valid until its CQE is reaped.
    pub(crate) unsafe fn push(&self, entry: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the caller keeps the SQE's memory valid until its CQE.
        if unsafe { ring.submission().push(entry) }.is_err() {
            // More queued this iteration than the SQ holds: hand them over now.
            if let Err(e) = ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed");
            }
            self.unsubmitted.set(ring.submission().len() as u32);
            // SAFETY: as above.
            if unsafe { ring.submission().push(entry) }.is_err() {
                tracing::error!("io_uring submission queue stuck full");
            }
        }
        drop(ring);
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        self.in_flight.set(self.in_flight.get() + 1);
        self.wake();
    }

    /// Resumes a parked poller: an SQE is queued or a channel waits for room.
    fn wake(&self) {
        if let Some(p) = self.poller.borrow().as_ref() {
            if p.is_paused() {
                p.resume();
            }
        }
    }

    /// `chan` waits for room: it is woken after the next CQEs are reaped.
    pub(crate) fn starve(&self, chan: Weak<Chan>) {
        self.starved.borrow_mut().push(chan);
        self.wake();
    }

    /// Pauses the poller while nothing is queued or in flight and nobody
    /// waits for room: no CQE can come, and an idle ring polled on every
    /// iteration costs each iteration (and so each request) time.
    fn park_if_idle(&self) {
        if self.in_flight.get() == 0 && self.starved.borrow().is_empty() {
            if let Some(p) = self.poller.borrow().as_ref() {
                p.pause();
            }
        }
    }

    /// Hands queued SQEs to the kernel and moves its CQEs to [`Group::reaped`];
    /// with `wait`, first waits for at least one CQE.
    fn enter(&self, wait: bool) -> bool {
        let mut ring = self.ring.borrow_mut();
        let mut busy = false;
        if self.unsubmitted.get() > 0 || wait {
            let r = if wait {
                ring.submit_and_wait(1)
            } else {
                ring.submit()
            };
            match r {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN)
                        || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => tracing::warn!(error = %e, "io_uring submit failed"),
            }
            // What the kernel did not take stays queued, for the next round
            // (see the module doc).
            self.unsubmitted.set(ring.submission().len() as u32);
            busy = true;
        }
        let mut reaped = self.reaped.borrow_mut();
        for cqe in ring.completion() {
            reaped.push_back((cqe.user_data(), cqe.result()));
            busy = true;
        }
        busy
    }

    /// Hands the oldest reaped CQE to its channel; `false` if none is queued.
    fn dispatch_one(&self) -> bool {
        let Some((ud, res)) = self.reaped.borrow_mut().pop_front() else {
            return false;
        };
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        let key = (ud >> 32) as usize;
        let chan = self
            .members
            .borrow()
            .get(key)
            .and_then(|m| m.as_ref())
            .and_then(Weak::upgrade);
        match chan {
            Some(c) => c.finish(ud as u32, res),
            None => tracing::warn!(key, "io_uring: completion for no channel"),
        }
        true
    }

    /// Runs one CQE (waiting for one if none is reaped): for a channel
    /// leaving with requests in flight.
    pub(crate) fn complete_one(&self) {
        if !self.dispatch_one() {
            self.enter(true);
            self.dispatch_one();
        }
    }

    /// Enters the ring now for the SQEs queued (buffered reads served from
    /// the page cache complete inside the submission) and completes what it
    /// finds ([`crate::bdev::Channel::kick`]); skipped while the group's own
    /// poll is running (a completion that kicks), which submits at its next
    /// round anyway.
    pub(crate) fn kick(&self) {
        if self.unsubmitted.get() > 0 && !self.in_poll.get() {
            self.poll();
        }
    }

    /// Submits queued SQEs, then completes what the kernel has finished.
    fn poll(&self) -> PollStatus {
        self.in_poll.set(true);
        let st = self.poll_inner();
        self.in_poll.set(false);
        st
    }

    fn poll_inner(&self) -> PollStatus {
        let mut busy = self.enter(false);
        while self.dispatch_one() {}
        if !self.starved.borrow().is_empty() && self.has_room() {
            let starved = std::mem::take(&mut *self.starved.borrow_mut());
            for c in starved.iter().filter_map(Weak::upgrade) {
                if !c.wake_waiters() {
                    self.starved.borrow_mut().push(Rc::downgrade(&c));
                }
            }
            busy = true;
        }
        self.park_if_idle();
        busy.into()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(p) = self.poller.borrow_mut().take() {
            crate::leaf::unregister(&p);
        }
        if reactor::is_reactor_thread() {
            let _ = reactor::unregister_fd(self.efd.as_fd().as_raw_fd());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;
    use reactor::{CoreSet, Runtime, RuntimeConfig};

    /// An SQE the kernel cannot start (a flag bit it does not know: its
    /// error CQE is posted and `io_uring_enter` stops there) ahead of a good
    /// one: the good one, left in the SQ, is handed over at a later poll and
    /// completes, and nothing stays in flight. (A count of unsubmitted SQEs
    /// set to zero after the first enter left it there for good.)
    #[test]
    fn sqes_the_kernel_did_not_take_are_submitted_at_the_next_poll() {
        let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").unwrap());
        cfg.pin = false;
        let rt = Runtime::start(cfg).unwrap();
        let res = rt
            .handle()
            .call_on(0, || {
                let g = Group::current().map_err(|e| e.to_string())?;
                // Keys of no member: their CQEs are counted and dropped.
                let bad = opcode::Nop::new()
                    .build()
                    .flags(squeue::Flags::from_bits_retain(0x80))
                    .user_data(u64::from(u32::MAX - 1) << 32 | u64::from(HINT));
                let good = opcode::Nop::new()
                    .build()
                    .user_data(u64::from(u32::MAX - 1) << 32 | u64::from(HINT));
                // SAFETY: NOPs name no memory.
                unsafe {
                    g.push(&bad);
                    g.push(&good);
                }
                let mut polls = 0;
                while g.in_flight.get() > 0 && polls < 100 {
                    g.poll();
                    polls += 1;
                }
                let left = (g.in_flight.get(), g.unsubmitted.get());
                // The ring goes with the last holder, on this thread.
                drop(g);
                Ok::<_, String>((left, polls))
            })
            .block()
            .unwrap();
        rt.shutdown();
        let (left, polls) = res.unwrap();
        assert_eq!(left, (0, 0), "(in flight, unsubmitted) after {polls} polls");
    }
}

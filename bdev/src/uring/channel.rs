//! One reactor's io_uring: requests become SQEs at submission, the ring is
//! entered once per reactor iteration by a poller, which also reaps CQEs.

use crate::bdev::Channel;
use crate::dma::{self, DmaBuf};
use crate::io::{BdevIo, IoStatus, IoType};
use io_uring::{opcode, squeue, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};
use reactor::{register_poller, PollStatus, PollerHandle};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

/// Builds an SQE against the file: its registered index if the ring has one, else the raw fd.
macro_rules! with_fd {
    ($ring:expr, |$fd:ident| $e:expr) => {
        if $ring.fixed_file.get() {
            let $fd = types::Fixed(0);
            $e
        } else {
            let $fd = types::Fd($ring.file.fd);
            $e
        }
    };
}

/// The user data of hint SQEs, whose completions are not requests.
const HINT: u64 = u64::MAX;

/// SQ entries per ring, and so requests in flight per channel.
pub(crate) const RING_ENTRIES: u32 = 512;

/// What a channel needs to know about the file.
#[derive(Clone, Copy)]
pub(crate) struct FileInfo {
    pub(crate) fd: RawFd,
    pub(crate) direct: bool,
    /// The file lives in memory only (tmpfs, ramfs).
    pub(crate) memory_backed: bool,
    pub(crate) block: u32,
    pub(crate) mem_align: u32,
}

impl FileInfo {
    /// Buffered, on storage that writes back (not O_DIRECT, not tmpfs): where
    /// [`BdevIo::write_behind`] hints are worth a `sync_file_range`.
    fn write_back(&self) -> bool {
        !self.direct && !self.memory_backed
    }

    /// Buffered and memory-backed (tmpfs): reads are memory copies that io_uring
    /// would hand to an io-wq thread (tmpfs has no non-blocking reads), so the
    /// reactor does them itself, as the malloc bdev does. Writes still go to
    /// io-wq: a write allocates pages, and with the reads on the reactor's core
    /// and the writes on a helper core the copy work is split (measured faster
    /// than the reactor doing both).
    fn inline_reads(&self) -> bool {
        !self.direct && self.memory_backed
    }
}

/// One request in flight.
struct Slot {
    io: Option<Box<BdevIo>>,
    /// Aligned copy of the data for a misaligned O_DIRECT request.
    bounce: Option<DmaBuf>,
    /// Bytes transferred so far (short transfers are resumed).
    done: u64,
    /// Segment array for vectored requests (capacity kept between uses).
    iov: Vec<libc::iovec>,
    /// A write-zeroes that fell back from ZERO_RANGE to PUNCH_HOLE.
    zero_fallback: bool,
    /// A FUA write-zeroes or discard whose `fallocate` is done: the slot now
    /// runs the `fdatasync` that makes it durable (writes use `RWF_DSYNC`).
    fua_sync: bool,
}

struct Ring {
    ring: RefCell<IoUring>,
    file: FileInfo,
    /// The file is registered (index 0); cleared if a re-registration fails.
    fixed_file: Cell<bool>,
    /// Registered buffers: (start, len) by index.
    fixed_bufs: Vec<(usize, usize)>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    unsubmitted: Cell<u32>,
    /// [`Ring::poll`] is running (a kick from inside a completion waits).
    in_poll: Cell<bool>,
    waiters: RefCell<Vec<Box<dyn FnOnce()>>>,
    reaped: RefCell<Vec<(u64, i32)>>,
    efd: EventFd,
    /// Hint SQEs ([`HINT`]) whose CQEs are not reaped yet.
    hints: Cell<u32>,
    /// The ring's poller, paused while nothing is queued or in flight (see
    /// [`Ring::park_if_idle`]) and resumed by the next SQE.
    poller: RefCell<Option<PollerHandle>>,
    /// Keeps the file open as long as the ring may use its descriptor.
    _file: Arc<File>,
}

/// The channel handed to the bdev layer.
pub(crate) struct UringChannel {
    ring: Rc<Ring>,
    poller: PollerHandle,
}

fn build_ring() -> std::io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(RING_ENTRIES * 2)
        .setup_single_issuer()
        .setup_clamp();
    match b.build(RING_ENTRIES) {
        Ok(r) => Ok(r),
        // Older kernels lack SINGLE_ISSUER; plain rings work everywhere.
        Err(_) => IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES),
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

impl UringChannel {
    pub(crate) fn new(
        name: &str,
        file: FileInfo,
        keep: Arc<File>,
    ) -> std::io::Result<UringChannel> {
        if !reactor::is_reactor_thread() {
            return Err(std::io::Error::other(
                "uring channels are created on a reactor thread",
            ));
        }
        let ring = build_ring()?;
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(efd.as_fd().as_raw_fd())?;
        set_worker_affinity(&ring);
        let fixed_file = match ring.submitter().register_files(&[file.fd]) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "io_uring: registered files unavailable");
                false
            }
        };
        // The kernel takes buffers of at most 1 GiB each.
        let regions: Vec<(usize, usize)> = dma::regions()
            .into_iter()
            .filter(|&(_, len)| len <= 1 << 30)
            .collect();
        let iovs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        let fixed_bufs = if iovs.is_empty() {
            Vec::new()
        } else {
            // SAFETY: the arena's regions stay mapped for the life of the process,
            // so the kernel's pinned view of them never dangles.
            match unsafe { ring.submitter().register_buffers(&iovs) } {
                Ok(()) => regions,
                Err(e) => {
                    tracing::debug!(error = %e, "io_uring: registered buffers unavailable");
                    Vec::new()
                }
            }
        };
        let slots = (0..RING_ENTRIES)
            .map(|_| Slot {
                io: None,
                bounce: None,
                done: 0,
                iov: Vec::new(),
                zero_fallback: false,
                fua_sync: false,
            })
            .collect();
        let r = Rc::new(Ring {
            ring: RefCell::new(ring),
            file,
            fixed_file: Cell::new(fixed_file),
            fixed_bufs,
            slots: RefCell::new(slots),
            free: RefCell::new((0..RING_ENTRIES).rev().collect()),
            unsubmitted: Cell::new(0),
            in_poll: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
            reaped: RefCell::new(Vec::with_capacity(RING_ENTRIES as usize * 2)),
            efd,
            hints: Cell::new(0),
            poller: RefCell::new(None),
            _file: keep,
        });
        reactor::register_fd(r.efd.as_fd().as_raw_fd())?;
        let weak = Rc::downgrade(&r);
        let poller = register_poller(&format!("bdev_uring_{name}"), move || {
            match weak.upgrade() {
                Some(r) => r.poll(),
                None => PollStatus::Idle,
            }
        });
        *r.poller.borrow_mut() = Some(poller.clone());
        Ok(UringChannel { ring: r, poller })
    }
}

impl Channel for UringChannel {
    /// The ring's registered copy of the file is the old open file: the one
    /// now behind the descriptor takes its place (requests in flight keep
    /// the old one until they complete); if that fails, the ring uses the
    /// plain descriptor from now on.
    fn file_reopened(&self) {
        let r = &self.ring;
        if !r.fixed_file.get() {
            return;
        }
        let res = r
            .ring
            .borrow()
            .submitter()
            .register_files_update(0, &[r.file.fd]);
        if let Err(e) = res {
            tracing::warn!(error = %e, "io_uring: registered file not updated; using the descriptor");
            r.fixed_file.set(false);
        }
    }

    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if io.io_type == IoType::Read && self.ring.file.inline_reads() {
            let st = read_inline(self.ring.file.fd, &mut io);
            crate::complete_deferred(io, st);
            return Ok(());
        }
        let Some(idx) = self.ring.free.borrow_mut().pop() else {
            return Err(io);
        };
        self.ring.start(idx, io);
        Ok(())
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.ring.waiters.borrow_mut().push(f);
    }

    /// Enters the ring now for the SQEs queued (buffered reads served from
    /// the page cache complete inside the submission) and completes what it
    /// finds; skipped while the ring's own poll is running (a completion
    /// that kicks), which submits at its next round anyway.
    fn kick(&self) {
        let r = &self.ring;
        if r.unsubmitted.get() > 0 && !r.in_poll.get() {
            r.poll();
        }
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        crate::leaf::unregister(&self.poller);
        // The kernel may still write into the buffers of requests in flight: wait
        // for every one before the memory can go away.
        let r = &self.ring;
        while (r.free.borrow().len() as u32) < RING_ENTRIES {
            let _ = r.ring.borrow_mut().submit_and_wait(1);
            r.poll();
        }
        if reactor::is_reactor_thread() {
            let _ = reactor::unregister_fd(r.efd.as_fd().as_raw_fd());
        }
        let ws = std::mem::take(&mut *r.waiters.borrow_mut());
        for w in ws {
            w();
        }
    }
}

/// Reads a request's segments with `pread` on the calling thread.
fn read_inline(fd: RawFd, io: &mut BdevIo) -> IoStatus {
    let mut off = io.offset;
    for seg in io.segments_mut() {
        let (base, len) = (seg.as_mut_ptr(), seg.len());
        let mut done = 0;
        while done < len {
            let at = (off + done as u64) as libc::off_t;
            // SAFETY: [base + done, base + len) lies in `seg`, writable memory we
            // hold exclusively (`&mut`) for the call.
            let r = unsafe { libc::pread(fd, base.add(done).cast(), len - done, at) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return IoStatus::from_errno(-e.raw_os_error().unwrap_or(libc::EIO));
            }
            if r == 0 {
                tracing::warn!(offset = off + done as u64, "uring: unexpected end of file");
                return IoStatus::Eio;
            }
            done += r as usize;
        }
        off += len as u64;
    }
    IoStatus::Success
}

fn misaligned(io: &BdevIo, f: &FileInfo) -> bool {
    let mem = f.mem_align as usize - 1;
    let blk = f.block as usize - 1;
    io.iovs()
        .iter()
        .any(|v| (v.as_ptr() as usize) & mem != 0 || v.len() & blk != 0)
}

impl Ring {
    /// Takes a request into slot `idx` and queues its SQE.
    fn start(&self, idx: u32, io: Box<BdevIo>) {
        if self.file.direct && io.io_type.has_data() && misaligned(&io, &self.file) {
            match DmaBuf::new_dirty(io.len as usize) {
                Ok(mut b) => {
                    if io.io_type == IoType::Write {
                        io.copy_out(0, b.as_mut_slice());
                    }
                    self.slots.borrow_mut()[idx as usize].bounce = Some(b);
                }
                Err(_) => {
                    self.free.borrow_mut().push(idx);
                    crate::complete_deferred(io, IoStatus::Nomem);
                    return;
                }
            }
        }
        {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[idx as usize];
            s.done = 0;
            s.zero_fallback = false;
            s.fua_sync = false;
            s.io = Some(io);
        }
        self.push_sqe(idx);
    }

    /// Builds and queues the SQE for slot `idx` from its current progress.
    fn push_sqe(&self, idx: u32) {
        let mut slots = self.slots.borrow_mut();
        let Slot {
            io,
            bounce,
            done,
            iov,
            zero_fallback,
            fua_sync,
        } = &mut slots[idx as usize];
        let Some(io) = io.as_ref() else { return };
        let off = io.offset + *done;
        let rest = io.len - *done;
        let entry = match io.io_type {
            IoType::Read | IoType::Write => self.rw_sqe(io, bounce, *done as usize, iov, off, rest),
            _ if *fua_sync => with_fd!(self, |fd| opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            IoType::Flush => with_fd!(self, |fd| opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            IoType::WriteZeroes | IoType::Unmap => {
                let mode = if io.io_type == IoType::Unmap || *zero_fallback {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                with_fd!(self, |fd| opcode::Fallocate::new(fd, rest)
                    .offset(off)
                    .mode(mode)
                    .build())
            }
        };
        let entry = entry.user_data(idx as u64);
        drop(slots);
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the SQE's buffers (the request's segments, its bounce buffer or
        // its iovec array) live in slot `idx` until its CQE is reaped.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // Not expected (one slot per SQ entry): make room by submitting, then retry.
            let _ = ring.submit();
            // SAFETY: as above.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                tracing::error!("io_uring submission queue stuck full");
            }
        }
        drop(ring);
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        self.wake();
    }

    /// Resumes a parked poller: an SQE is queued.
    fn wake(&self) {
        if let Some(p) = self.poller.borrow().as_ref() {
            if p.is_paused() {
                p.resume();
            }
        }
    }

    /// Pauses the poller while the ring has nothing queued, nothing in flight
    /// (requests or hints) and nobody waiting for room: no CQE can come, and
    /// a reactor with many devices open (each with a ring per reactor) would
    /// otherwise poll every idle ring on every iteration, making each
    /// iteration (and so each request, and each open) cost time in
    /// proportion to the number of devices.
    fn park_if_idle(&self) {
        if self.unsubmitted.get() == 0
            && self.hints.get() == 0
            && self.free.borrow().len() as u32 == RING_ENTRIES
            && self.waiters.borrow().is_empty()
        {
            if let Some(p) = self.poller.borrow().as_ref() {
                p.pause();
            }
        }
    }

    fn rw_sqe(
        &self,
        io: &BdevIo,
        bounce: &mut Option<DmaBuf>,
        skip: usize,
        iov: &mut Vec<libc::iovec>,
        off: u64,
        rest: u64,
    ) -> squeue::Entry {
        let write = io.io_type == IoType::Write;
        let flags = if write && io.fua { libc::RWF_DSYNC } else { 0 };
        // One contiguous buffer: the bounce buffer or a single segment.
        let single: Option<*mut u8> = match bounce {
            Some(b) => Some(b.as_mut_ptr().wrapping_add(skip)),
            None if io.iovs().len() == 1 => Some(io.iovs()[0].as_ptr().wrapping_add(skip)),
            None => None,
        };
        let len = rest.min(u32::MAX as u64 & !4095) as u32;
        if let Some(p) = single {
            let a = p as usize;
            let fixed = self
                .fixed_bufs
                .iter()
                .position(|&(b, l)| a >= b && a + len as usize <= b + l);
            return match (fixed, write) {
                (Some(i), false) => {
                    with_fd!(self, |fd| opcode::ReadFixed::new(fd, p, len, i as u16)
                        .offset(off)
                        .rw_flags(flags)
                        .build())
                }
                (Some(i), true) => {
                    with_fd!(self, |fd| opcode::WriteFixed::new(fd, p, len, i as u16)
                        .offset(off)
                        .rw_flags(flags)
                        .build())
                }
                (None, false) => with_fd!(self, |fd| opcode::Read::new(fd, p, len)
                    .offset(off)
                    .rw_flags(flags)
                    .build()),
                (None, true) => with_fd!(self, |fd| opcode::Write::new(fd, p, len)
                    .offset(off)
                    .rw_flags(flags)
                    .build()),
            };
        }
        // Vectored: the segments from byte `skip` on.
        iov.clear();
        let mut skip_left = skip;
        for v in io.iovs() {
            if skip_left >= v.len() {
                skip_left -= v.len();
                continue;
            }
            iov.push(libc::iovec {
                iov_base: v.as_ptr().wrapping_add(skip_left) as *mut libc::c_void,
                iov_len: v.len() - skip_left,
            });
            skip_left = 0;
        }
        let iovp = iov.as_ptr();
        let n = iov.len().min(1024) as u32;
        if write {
            with_fd!(self, |fd| opcode::Writev::new(fd, iovp, n)
                .offset(off)
                .rw_flags(flags)
                .build())
        } else {
            with_fd!(self, |fd| opcode::Readv::new(fd, iovp, n)
                .offset(off)
                .rw_flags(flags)
                .build())
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
        let mut busy = false;
        {
            let mut ring = self.ring.borrow_mut();
            if self.unsubmitted.get() > 0 {
                match ring.submit() {
                    Ok(_) => self.unsubmitted.set(0),
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            || e.raw_os_error() == Some(libc::EAGAIN) => {}
                    Err(e) => tracing::warn!(error = %e, "io_uring submit failed"),
                }
                busy = true;
            }
            let mut reaped = self.reaped.borrow_mut();
            for cqe in ring.completion() {
                reaped.push((cqe.user_data(), cqe.result()));
            }
        }
        let n = self.reaped.borrow().len();
        if n == 0 {
            self.park_if_idle();
            return busy.into();
        }
        for i in 0..n {
            let (ud, res) = self.reaped.borrow()[i];
            if ud == HINT {
                self.hints.set(self.hints.get().saturating_sub(1));
                continue;
            }
            self.finish(ud as u32, res);
        }
        self.reaped.borrow_mut().clear();
        if !self.waiters.borrow().is_empty() && !self.free.borrow().is_empty() {
            let ws = std::mem::take(&mut *self.waiters.borrow_mut());
            for w in ws {
                w();
            }
        }
        self.park_if_idle();
        PollStatus::Busy
    }

    /// Queues a `sync_file_range(SYNC_FILE_RANGE_WRITE)` of a range just written
    /// (a hint: skipped when the submission queue is full; its CQE, tagged
    /// [`HINT`], is ignored).
    fn start_writeback(&self, offset: u64, len: u64) {
        let Ok(len) = u32::try_from(len) else { return };
        let e = with_fd!(self, |fd| opcode::SyncFileRange::new(fd, len)
            .offset(offset)
            .flags(libc::SYNC_FILE_RANGE_WRITE)
            .build())
        .user_data(HINT);
        // SAFETY: the SQE refers to no user memory.
        if unsafe { self.ring.borrow_mut().submission().push(&e) }.is_ok() {
            self.unsubmitted.set(self.unsubmitted.get() + 1);
            self.hints.set(self.hints.get() + 1);
            self.wake();
        }
    }

    /// Handles the CQE of slot `idx`.
    fn finish(&self, idx: u32, res: i32) {
        let status = {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(idx as usize) else {
                return;
            };
            let Some(io) = s.io.as_ref() else { return };
            if res < 0 {
                if res == -libc::EOPNOTSUPP
                    && io.io_type == IoType::WriteZeroes
                    && !s.zero_fallback
                    && !s.fua_sync
                {
                    // The filesystem has no ZERO_RANGE: a punched hole reads as zeroes too.
                    s.zero_fallback = true;
                    drop(slots);
                    self.push_sqe(idx);
                    return;
                }
                IoStatus::from_errno(res)
            } else if io.fua && !io.io_type.has_data() && io.io_type != IoType::Flush && !s.fua_sync
            {
                // FUA write-zeroes / discard: `fallocate` is not synchronous; sync now.
                s.fua_sync = true;
                drop(slots);
                self.push_sqe(idx);
                return;
            } else if io.io_type.has_data() {
                s.done += res as u64;
                if res == 0 && s.done < io.len {
                    tracing::warn!(offset = io.offset + s.done, "uring: unexpected end of file");
                    IoStatus::Eio
                } else if s.done < io.len {
                    drop(slots);
                    self.push_sqe(idx);
                    return;
                } else {
                    IoStatus::Success
                }
            } else {
                IoStatus::Success
            }
        };
        let (io, bounce) = {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[idx as usize];
            (s.io.take(), s.bounce.take())
        };
        self.free.borrow_mut().push(idx);
        let Some(mut io) = io else { return };
        if io.write_behind
            && self.file.write_back()
            && status.is_ok()
            && io.io_type == IoType::Write
        {
            self.start_writeback(io.offset, io.len);
        }
        if let Some(b) = bounce {
            if io.io_type == IoType::Read && status.is_ok() {
                io.copy_in(0, b.as_slice());
            }
        }
        io.complete(status);
    }
}

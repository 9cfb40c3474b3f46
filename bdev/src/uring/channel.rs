//! A uring bdev's channel on one reactor: requests become SQEs on the
//! reactor's shared ring ([`super::group`]) at submission; the ring's poller
//! enters it once per reactor iteration and hands each CQE back to the
//! channel's slot it names.

use super::group::{Group, HINT};
use crate::bdev::Channel;
use crate::dma::DmaBuf;
use crate::io::{BdevIo, IoStatus, IoType};
use io_uring::{opcode, squeue, types};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

/// Builds an SQE against the file: its registered slot if it has one, else the raw fd.
macro_rules! with_fd {
    ($chan:expr, |$fd:ident| $e:expr) => {
        if let Some(i) = $chan.fixed_file.get() {
            let $fd = types::Fixed(i);
            $e
        } else {
            let $fd = types::Fd($chan.file.fd);
            $e
        }
    };
}

/// Requests in flight per channel (slots are made as they are first needed).
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
#[derive(Default)]
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

/// A channel's state, a member of its reactor's [`Group`].
pub(crate) struct Chan {
    group: Rc<Group>,
    /// The member key in the group (the high half of its SQEs' user data).
    key: u32,
    file: FileInfo,
    /// The file's registered slot in the group's ring; cleared if a
    /// re-registration fails (the descriptor is used from then on).
    fixed_file: Cell<Option<u32>>,
    /// A slot whose re-registration failed, freed when the channel goes.
    stale_file: Cell<Option<u32>>,
    /// Made as needed, up to [`RING_ENTRIES`]; an idle channel holds few.
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    waiters: RefCell<Vec<Box<dyn FnOnce()>>>,
    /// Hint SQEs ([`HINT`]) whose CQEs are not reaped yet.
    hints: Cell<u32>,
    /// This channel, for the group's list of channels waiting for room.
    me: Weak<Chan>,
    /// Keeps the file open as long as the ring may use its descriptor.
    _file: Arc<File>,
}

/// The channel handed to the bdev layer.
pub(crate) struct UringChannel {
    chan: Rc<Chan>,
}

impl UringChannel {
    pub(crate) fn new(file: FileInfo, keep: Arc<File>) -> std::io::Result<UringChannel> {
        let group = Group::current()?;
        let fixed_file = group.register_file(file.fd);
        let chan = Rc::new_cyclic(|me: &Weak<Chan>| Chan {
            key: group.join(me.clone()),
            group: group.clone(),
            file,
            fixed_file: Cell::new(fixed_file),
            stale_file: Cell::new(None),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            waiters: RefCell::new(Vec::new()),
            hints: Cell::new(0),
            me: me.clone(),
            _file: keep,
        });
        Ok(UringChannel { chan })
    }
}

impl Channel for UringChannel {
    /// The ring's registered copy of the file is the old open file: the one
    /// now behind the descriptor takes its place (requests in flight keep
    /// the old one until they complete); if that fails, the channel uses the
    /// plain descriptor from now on.
    fn file_reopened(&self) {
        let c = &self.chan;
        let Some(idx) = c.fixed_file.get() else {
            return;
        };
        if let Err(e) = c.group.update_file(idx, c.file.fd) {
            tracing::warn!(error = %e, "io_uring: registered file not updated; using the descriptor");
            // Requests queued with the slot keep it until they are reaped:
            // it is freed when the channel goes.
            c.fixed_file.set(None);
            c.stale_file.set(Some(idx));
        }
    }

    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let c = &self.chan;
        if io.io_type == IoType::Read && c.file.inline_reads() {
            let st = read_inline(c.file.fd, &mut io);
            crate::complete_deferred(io, st);
            return Ok(());
        }
        if !c.group.has_room() {
            return Err(io);
        }
        let Some(idx) = c.take_slot() else {
            return Err(io);
        };
        c.start(idx, io);
        Ok(())
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        let c = &self.chan;
        let first = c.waiters.borrow().is_empty();
        c.waiters.borrow_mut().push(f);
        if first {
            c.group.starve(c.me.clone());
        }
    }

    /// Enters the ring now for the SQEs queued (buffered reads served from
    /// the page cache complete inside the submission) and completes what it
    /// finds; skipped while the ring's own poll is running (a completion
    /// that kicks), which submits at its next round anyway.
    fn kick(&self) {
        self.chan.group.kick();
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // The kernel may still write into the buffers of requests in flight,
        // and a hint names the file's slot: wait for every CQE of this
        // channel before the memory, the slot and the key can go.
        let c = &self.chan;
        while c.busy() {
            c.group.complete_one();
        }
        if let Some(idx) = c.fixed_file.take().or(c.stale_file.take()) {
            c.group.unregister_file(idx);
        }
        c.group.leave(c.key);
        let ws = std::mem::take(&mut *c.waiters.borrow_mut());
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

impl Chan {
    /// Whether any SQE of this channel (request or hint) awaits its CQE.
    fn busy(&self) -> bool {
        self.hints.get() > 0 || self.free.borrow().len() < self.slots.borrow().len()
    }

    /// A free slot, made if there are fewer than [`RING_ENTRIES`].
    fn take_slot(&self) -> Option<u32> {
        if let Some(i) = self.free.borrow_mut().pop() {
            return Some(i);
        }
        let mut slots = self.slots.borrow_mut();
        if slots.len() as u32 >= RING_ENTRIES {
            return None;
        }
        slots.push(Slot::default());
        Some(slots.len() as u32 - 1)
    }

    /// Runs the waiters if a request may be taken now; `false` if not (the
    /// channel is full: it stays on the group's list).
    pub(super) fn wake_waiters(&self) -> bool {
        if self.free.borrow().is_empty() && self.slots.borrow().len() as u32 >= RING_ENTRIES {
            return false;
        }
        let ws = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in ws {
            w();
        }
        true
    }

    /// Queues `entry` for slot `slot` of this channel.
    ///
    /// # Safety
    /// Whatever memory the SQE names stays valid until its CQE is reaped.
    unsafe fn push(&self, entry: squeue::Entry, slot: u32) {
        let e = entry.user_data((self.key as u64) << 32 | slot as u64);
        // SAFETY: passed on from the caller.
        unsafe { self.group.push(&e) };
    }

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
        drop(slots);
        // SAFETY: the SQE's buffers (the request's segments, its bounce buffer or
        // its iovec array, all on the heap: they stay put when `slots` grows)
        // live in slot `idx` until its CQE is reaped.
        unsafe { self.push(entry, idx) };
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
            let fixed = self.group.fixed_buf(a, len as usize);
            return match (fixed, write) {
                (Some(i), false) => {
                    with_fd!(self, |fd| opcode::ReadFixed::new(fd, p, len, i)
                        .offset(off)
                        .rw_flags(flags)
                        .build())
                }
                (Some(i), true) => {
                    with_fd!(self, |fd| opcode::WriteFixed::new(fd, p, len, i)
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

    /// Queues a `sync_file_range(SYNC_FILE_RANGE_WRITE)` of a range just written
    /// (a hint: skipped when the submission queue is full; its CQE, tagged
    /// [`HINT`], is ignored).
    fn start_writeback(&self, offset: u64, len: u64) {
        let Ok(len) = u32::try_from(len) else { return };
        if !self.group.has_room() {
            return;
        }
        let e = with_fd!(self, |fd| opcode::SyncFileRange::new(fd, len)
            .offset(offset)
            .flags(libc::SYNC_FILE_RANGE_WRITE)
            .build());
        // SAFETY: the SQE refers to no user memory.
        unsafe { self.push(e, HINT) };
        self.hints.set(self.hints.get() + 1);
    }

    /// Handles the CQE of slot `idx` (or of a hint).
    pub(super) fn finish(&self, idx: u32, res: i32) {
        if idx == HINT {
            self.hints.set(self.hints.get().saturating_sub(1));
            return;
        }
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

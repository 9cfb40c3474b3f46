//! The I/O request: what to do, where, with which memory, and who to tell.
//!
//! Requests are boxed ([`Box<BdevIo>`] is what travels) and the boxes are
//! recycled per thread, as SPDK caches its `spdk_bdev_io`s per thread: a
//! submitter done with a request hands it to [`BdevIo::recycle`], which
//! drops everything the request holds (its buffers, a foreign mapping's
//! keeper, its completion target and statistics) at once and keeps the
//! empty box in this thread's pool (at most `POOL_MAX`); the next request
//! made on the thread ([`BdevIo::new`] and every constructor built on it)
//! takes a box from there instead of the allocator. Only a box given up by
//! value goes in, so a request still referenced is never handed out again;
//! a request simply dropped is freed as any box is. Requests are not
//! `Send`, so a box is recycled on the thread that made it.

use crate::dma::DmaBuf;
use crate::stats::IoStats;
use smallvec::SmallVec;
use std::cell::RefCell;
use std::rc::Rc;

/// Most empty boxes a thread keeps for its next requests ([`BdevIo::recycle`]).
const POOL_MAX: usize = 1024;

thread_local! {
    /// This thread's empty request boxes (see the module doc): the boxes
    /// themselves are what is kept, so `Vec<Box<_>>` is the point.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<BdevIo>>> = const { RefCell::new(Vec::new()) };
}

/// The kinds of I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoType {
    /// Read into the request's buffers.
    Read,
    /// Write from the request's buffers.
    Write,
    /// Make earlier completed writes durable.
    Flush,
    /// Discard a range (reads may then return anything the bdev documents; ours return zeroes).
    Unmap,
    /// Make a range read as zeroes.
    WriteZeroes,
}

impl IoType {
    /// SPDK's name of the type (as in `supported_io_types`).
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether the type moves data through buffers.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }
}

/// The outcome of an I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// Not completed yet.
    Pending,
    /// Done.
    Success,
    /// Device error.
    Eio,
    /// No space left (thin provisioning, a full image file).
    Enospc,
    /// Out of range or misaligned request.
    Einval,
    /// The bdev does not support this I/O type.
    Unsupported,
    /// No memory / resources to carry it out.
    Nomem,
    /// Aborted (reset, detach, shutdown).
    Aborted,
    /// The device is read-only.
    ReadOnly,
}

impl IoStatus {
    /// Whether it succeeded.
    pub fn is_ok(self) -> bool {
        self == IoStatus::Success
    }

    /// The positive errno matching this status.
    pub fn errno(self) -> i32 {
        match self {
            IoStatus::Pending | IoStatus::Success => 0,
            IoStatus::Eio => libc::EIO,
            IoStatus::Enospc => libc::ENOSPC,
            IoStatus::Einval => libc::EINVAL,
            IoStatus::Unsupported => libc::ENOTSUP,
            IoStatus::Nomem => libc::ENOMEM,
            IoStatus::Aborted => libc::ECANCELED,
            IoStatus::ReadOnly => libc::EPERM,
        }
    }

    /// The status matching a (positive or negative) errno.
    pub fn from_errno(e: i32) -> Self {
        match e.abs() {
            0 => IoStatus::Success,
            libc::ENOSPC | libc::EDQUOT => IoStatus::Enospc,
            libc::EINVAL => IoStatus::Einval,
            libc::ENOTSUP => IoStatus::Unsupported,
            libc::ENOMEM | libc::EAGAIN => IoStatus::Nomem,
            libc::ECANCELED => IoStatus::Aborted,
            libc::EPERM | libc::EROFS | libc::EACCES => IoStatus::ReadOnly,
            _ => IoStatus::Eio,
        }
    }
}

impl std::fmt::Display for IoStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            IoStatus::Pending => "pending",
            IoStatus::Success => "success",
            IoStatus::Eio => "input/output error (EIO)",
            IoStatus::Enospc => "no space left on device (ENOSPC)",
            IoStatus::Einval => "invalid request: out of range or misaligned (EINVAL)",
            IoStatus::Unsupported => "operation not supported by this bdev (ENOTSUP)",
            IoStatus::Nomem => "out of resources (ENOMEM)",
            IoStatus::Aborted => "aborted (ECANCELED)",
            IoStatus::ReadOnly => "device is read-only (EPERM)",
        };
        f.write_str(s)
    }
}

/// One segment of a request's memory.
#[derive(Debug, Clone, Copy)]
pub struct IoVec {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

impl IoVec {
    /// Start address (for io_uring / NVMe PRPs).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The buffers a request owns (see [`BdevIo`]'s memory contract).
enum Memory {
    /// None (flush, unmap, write-zeroes, or a sub-request over its parent's).
    None,
    /// One buffer: [`BdevIo::new`], [`BdevIo::read`], [`BdevIo::write`].
    One(DmaBuf),
    /// Several: [`BdevIo::vectored`].
    Many(Vec<DmaBuf>),
    /// Memory mapped elsewhere (a vhost-user guest's pages), kept mapped by
    /// the keeper for as long as the request holds it: [`BdevIo::over_foreign`].
    Kept(#[allow(dead_code)] std::sync::Arc<dyn std::any::Any + Send + Sync>),
}

/// Who is told when a request completes. Called on the submitting reactor,
/// never from inside `submit`.
pub trait IoDone {
    /// The request comes back with its status set.
    fn io_done(&self, io: Box<BdevIo>);
}

/// An I/O request. The submitter owns it (and its memory) until it submits it;
/// the bdev owns it until it completes it, which hands it back through `done`.
///
/// Memory safety of the segments: a request built with [`BdevIo::new`],
/// [`BdevIo::read`], [`BdevIo::write`] or [`BdevIo::vectored`] owns its
/// buffers: they move into the request and come back out only through
/// [`BdevIo::take_buf`] / [`BdevIo::take_bufs`], which need the request itself,
/// so safe code cannot free (or touch) memory that a read in flight will fill.
/// Moving a buffer into a request costs nothing per I/O (no reference count,
/// no allocation for one buffer). A buffer given to a request is gone:
///
/// ```compile_fail,E0382
/// use bdev::{BdevIo, DmaBuf, IoType};
/// let a = DmaBuf::new(4096).unwrap();
/// let b = DmaBuf::new(4096).unwrap();
/// let io = BdevIo::vectored(IoType::Read, 0, vec![a, b], None);
/// drop(a); // error[E0382]: use of moved value: `a`
/// # drop(io);
/// ```
///
/// The one exception is [`BdevIo::sub_io`]: a sub-request over a range of its
/// parent's memory, for virtual bdevs splitting a request; it is `unsafe`, and
/// its caller keeps the parent alive and its range untouched until the
/// sub-request completes.
pub struct BdevIo {
    /// What to do.
    pub io_type: IoType,
    /// Byte offset on the bdev.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Force unit access, for writes, write-zeroes and discards (ignored on
    /// reads and flushes): when the request completes successfully, its effect
    /// is durable (survives a crash or power loss) *together with every piece
    /// of metadata needed to read it back* (a qcow2 image's L2 / L1 entries and
    /// refcounts), as if a flush had completed after it. Nothing is promised
    /// for other requests (unlike a flush). Each bdev honours it natively or
    /// emulates it; see "Force unit access" in [`crate::Bdev`]. The flag stays
    /// on the request wherever it travels (a device's forwarding, a qcow2
    /// image's remote channel, an error bdev's child).
    pub fua: bool,
    /// A hint for buffered file bdevs: once this write is in the page cache,
    /// start writing it back, because the submitter will flush soon (a stream
    /// job's bulk copy), so the disk works while the copy goes on and the final
    /// flush finds little left. Other bdevs ignore it.
    pub write_behind: bool,
    /// A hint: this is a job's bulk copy (a stream or commit reading its
    /// source), not a client's request; bdevs that queue requests on a shared
    /// path (the NBD client's connections) let the others go first, so that a
    /// client does not wait behind megabytes of job data. Sub-requests
    /// ([`BdevIo::sub_io`]) inherit it, so it reaches a qcow2 image's backing
    /// file; bdevs that forward a request keep it. Others ignore it.
    pub background: bool,
    /// The outcome, set on completion.
    pub status: IoStatus,
    /// Free for the submitter (a slot index, a sequence number).
    pub tag: u64,
    /// Tick of submission (set by [`crate::IoChannel::submit`]).
    pub submit_tick: u64,
    /// Tick of completion, read once by [`BdevIo::complete`] for the channel's
    /// statistics (0 for requests that did not go through an [`crate::IoChannel`]).
    /// Submitters measuring latency reuse it instead of reading the clock again.
    pub complete_tick: u64,
    iovs: SmallVec<[IoVec; 2]>,
    mem: Memory,
    done: Option<Rc<dyn IoDone>>,
    pub(crate) stats: Option<Rc<IoStats>>,
}

impl BdevIo {
    /// A request over a whole buffer (`buf` may be `None` for flush, unmap and
    /// write-zeroes). For reads and writes, `len` is the buffer's length.
    pub fn new(
        io_type: IoType,
        offset: u64,
        len: u64,
        buf: Option<DmaBuf>,
        done: Option<Rc<dyn IoDone>>,
    ) -> Box<Self> {
        let mut iovs = SmallVec::new();
        let mut buf = buf;
        let len = match &mut buf {
            Some(b) if io_type.has_data() => {
                iovs.push(IoVec {
                    ptr: b.as_mut_ptr(),
                    len: b.len(),
                });
                b.len() as u64
            }
            _ => len,
        };
        let mem = match buf {
            Some(b) => Memory::One(b),
            None => Memory::None,
        };
        Self::boxed(io_type, offset, len, iovs, mem, done)
    }

    /// A fresh request in a box from this thread's pool, else a new one.
    #[inline]
    fn boxed(
        io_type: IoType,
        offset: u64,
        len: u64,
        iovs: SmallVec<[IoVec; 2]>,
        mem: Memory,
        done: Option<Rc<dyn IoDone>>,
    ) -> Box<Self> {
        let io = Self {
            io_type,
            offset,
            len,
            fua: false,
            write_behind: false,
            background: false,
            status: IoStatus::Pending,
            tag: 0,
            submit_tick: 0,
            complete_tick: 0,
            iovs,
            mem,
            done,
            stats: None,
        };
        // The pool's borrow runs no code of ours (a pop), so it cannot nest.
        match POOL.try_with(|p| p.borrow_mut().pop()) {
            Ok(Some(mut b)) => {
                // A pooled request holds nothing (`recycle` emptied it), so
                // dropping it here frees nothing; a plain assignment keeps
                // that true for any field added later.
                *b = io;
                b
            }
            _ => Box::new(io),
        }
    }

    /// Drops what the request holds (its buffers, a mapping's keeper, its
    /// completion target) now and keeps the empty box for this thread's next
    /// request (see the module doc); a plain drop when the pool is full.
    pub fn recycle(mut self: Box<Self>) {
        // Emptied before the pool is borrowed: these drops may run any code
        // (a last `Rc` of a completion target), new requests included.
        self.mem = Memory::None;
        self.done = None;
        self.stats = None;
        if self.iovs.spilled() {
            self.iovs = SmallVec::new();
        } else {
            self.iovs.clear();
        }
        let full = POOL.try_with(move |p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
                None
            } else {
                Some(self)
            }
        });
        drop(full);
    }

    /// A read of `buf.len()` bytes at `offset` into `buf`.
    pub fn read(offset: u64, buf: DmaBuf, done: Option<Rc<dyn IoDone>>) -> Box<Self> {
        let len = buf.len() as u64;
        Self::new(IoType::Read, offset, len, Some(buf), done)
    }

    /// A write of `buf` at `offset`.
    pub fn write(offset: u64, buf: DmaBuf, done: Option<Rc<dyn IoDone>>) -> Box<Self> {
        let len = buf.len() as u64;
        Self::new(IoType::Write, offset, len, Some(buf), done)
    }

    /// A request over several buffers (vectored), which it owns until
    /// [`BdevIo::take_bufs`] gives them back; `len` is their total length.
    pub fn vectored(
        io_type: IoType,
        offset: u64,
        mut bufs: Vec<DmaBuf>,
        done: Option<Rc<dyn IoDone>>,
    ) -> Box<Self> {
        let mut io = Self::new(io_type, offset, 0, None, done);
        if io_type.has_data() {
            for b in &mut bufs {
                io.iovs.push(IoVec {
                    ptr: b.as_mut_ptr(),
                    len: b.len(),
                });
                io.len += b.len() as u64;
            }
        }
        io.mem = Memory::Many(bufs);
        io
    }

    /// A request over memory it does not allocate, such as a vhost-user
    /// guest's pages: `segs` are (address, length) pairs inside a mapping that
    /// `keeper` keeps alive (an `Arc` of it: no allocation per request); the request holds the keeper until
    /// it is dropped or its buffers are taken, so the mapping outlives every use
    /// the bdev makes of the segments. No copy is made; `len` is the segments'
    /// total. Bdevs that need other alignment bounce as they do for any buffer.
    ///
    /// # Safety
    /// Every segment must be valid for reads and writes of its length for as
    /// long as `keeper` lives, and must not overlap another segment of the
    /// request. Nothing in this process may use the range while the request is
    /// in flight (memory another process shares, such as a guest's, may change
    /// under a write: the data written is then what the guest left, as with a
    /// DMA device).
    pub unsafe fn over_foreign(
        io_type: IoType,
        offset: u64,
        segs: &[(*mut u8, usize)],
        keeper: std::sync::Arc<dyn std::any::Any + Send + Sync>,
        done: Option<Rc<dyn IoDone>>,
    ) -> Box<Self> {
        let mut iovs = SmallVec::new();
        let mut total = 0;
        if io_type.has_data() {
            for &(ptr, len) in segs {
                iovs.push(IoVec { ptr, len });
                total += len as u64;
            }
        }
        Self::boxed(io_type, offset, total, iovs, Memory::Kept(keeper), done)
    }

    /// A request of `io_type` at `offset` over bytes `[start, start+len)` of
    /// `parent`'s memory (for virtual bdevs splitting a request). A read
    /// sub-request writes into that range of the parent's memory although it
    /// is given only `&parent`: sub-requests over disjoint ranges may be in
    /// flight together.
    ///
    /// # Safety
    /// The parent's memory must stay valid (the parent not completed, not dropped,
    /// its buffers not taken) until this request has completed, and nothing else
    /// may read or write `[start, start+len)` of it meanwhile (no other
    /// sub-request over an overlapping range, no `copy_in` / `copy_out` / `zero`
    /// there).
    ///
    /// The sub-request inherits the parent's [`BdevIo::background`] hint.
    pub unsafe fn sub_io(
        parent: &BdevIo,
        start: u64,
        len: u64,
        io_type: IoType,
        offset: u64,
        done: Option<Rc<dyn IoDone>>,
    ) -> Box<Self> {
        let mut io = Self::new(io_type, offset, len, None, done);
        io.background = parent.background;
        if io_type.has_data() {
            let mut skip = start as usize;
            let mut want = len as usize;
            for v in &parent.iovs {
                if want == 0 {
                    break;
                }
                if skip >= v.len {
                    skip -= v.len;
                    continue;
                }
                let take = (v.len - skip).min(want);
                // The pointer stays inside the parent's segment: skip < v.len and take <= v.len - skip.
                io.iovs.push(IoVec {
                    ptr: v.ptr.wrapping_add(skip),
                    len: take,
                });
                want -= take;
                skip = 0;
            }
        }
        io
    }

    /// The memory segments.
    pub fn iovs(&self) -> &[IoVec] {
        &self.iovs
    }

    /// The owned buffer, if the request was built over one buffer (the first
    /// one of a vectored request).
    pub fn buf(&self) -> Option<&DmaBuf> {
        self.bufs().first()
    }

    /// The owned buffers, in segment order (none for a sub-request).
    pub fn bufs(&self) -> &[DmaBuf] {
        match &self.mem {
            Memory::None | Memory::Kept(_) => &[],
            Memory::One(b) => std::slice::from_ref(b),
            Memory::Many(v) => v,
        }
    }

    /// Takes the owned buffer back (after completion) of a request built over
    /// one buffer; the request then has no memory. `None` for a vectored request
    /// (see [`BdevIo::take_bufs`]), which keeps its buffers.
    pub fn take_buf(&mut self) -> Option<DmaBuf> {
        match std::mem::replace(&mut self.mem, Memory::None) {
            Memory::One(b) => {
                self.iovs.clear();
                Some(b)
            }
            other => {
                self.mem = other;
                None
            }
        }
    }

    /// Takes every owned buffer back (after completion), in segment order; the
    /// request then has no memory.
    pub fn take_bufs(&mut self) -> Vec<DmaBuf> {
        self.iovs.clear();
        match std::mem::replace(&mut self.mem, Memory::None) {
            Memory::None | Memory::Kept(_) => Vec::new(),
            Memory::One(b) => vec![b],
            Memory::Many(v) => v,
        }
    }

    /// Replaces the completion target.
    pub fn set_done(&mut self, done: Option<Rc<dyn IoDone>>) {
        self.done = done;
    }

    /// Takes the completion target out (a forwarding layer that re-targets the
    /// request and restores the original before completing it).
    pub fn take_done(&mut self) -> Option<Rc<dyn IoDone>> {
        self.done.take()
    }

    /// The request's memory as byte slices, segment by segment (what a write
    /// writes). Segments never overlap one another: each is a distinct owned
    /// buffer, or a piece of a parent's distinct segments.
    #[inline]
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.iovs.iter().map(|v| {
            // SAFETY: the segment is valid for v.len bytes for the life of the
            // request (see the type's contract): owned buffers stay in the
            // request, a sub-request's parent outlives it (`sub_io`'s contract).
            unsafe { std::slice::from_raw_parts(v.ptr, v.len) }
        })
    }

    /// The request's memory as mutable byte slices, segment by segment (where a
    /// read puts the data). Needs the request itself (`&mut`): whoever fills
    /// the memory owns the request at that moment.
    #[inline]
    pub fn segments_mut(&mut self) -> impl Iterator<Item = &mut [u8]> + '_ {
        self.iovs.iter().map(|v| {
            // SAFETY: valid as in `segments`; exclusive because `&mut self` is,
            // segments do not overlap one another, and the owned buffers are
            // reachable otherwise only through `&self` (`bufs`) or by taking
            // them out; a sub-request's range is its own (`sub_io`'s contract).
            unsafe { std::slice::from_raw_parts_mut(v.ptr, v.len) }
        })
    }

    /// Copies `dst.len()` bytes from the request's memory at byte `pos` into `dst`.
    pub fn copy_out(&self, mut pos: usize, dst: &mut [u8]) {
        let mut filled = 0;
        for seg in self.segments() {
            if filled == dst.len() {
                break;
            }
            if pos >= seg.len() {
                pos -= seg.len();
                continue;
            }
            let n = (seg.len() - pos).min(dst.len() - filled);
            dst[filled..filled + n].copy_from_slice(&seg[pos..pos + n]);
            filled += n;
            pos = 0;
        }
    }

    /// Copies `src` into the request's memory at byte `pos`.
    pub fn copy_in(&mut self, mut pos: usize, src: &[u8]) {
        let mut done = 0;
        for seg in self.segments_mut() {
            if done == src.len() {
                break;
            }
            if pos >= seg.len() {
                pos -= seg.len();
                continue;
            }
            let n = (seg.len() - pos).min(src.len() - done);
            seg[pos..pos + n].copy_from_slice(&src[done..done + n]);
            done += n;
            pos = 0;
        }
    }

    /// Fills `len` bytes of the request's memory at `pos` with zeroes.
    pub fn zero(&mut self, mut pos: usize, len: usize) {
        let mut done = 0;
        for seg in self.segments_mut() {
            if done == len {
                break;
            }
            if pos >= seg.len() {
                pos -= seg.len();
                continue;
            }
            let n = (seg.len() - pos).min(len - done);
            seg[pos..pos + n].fill(0);
            done += n;
            pos = 0;
        }
    }

    /// Sets the status and hands the request back to its submitter. Bdevs call
    /// this from their pollers (or [`crate::complete_deferred`]), never inside `submit`.
    #[inline]
    pub fn complete(mut self: Box<Self>, status: IoStatus) {
        self.status = status;
        if let Some(st) = self.stats.take() {
            let now = reactor::ticks();
            self.complete_tick = now;
            st.record_at(&self, now);
        }
        if let Some(d) = self.done.clone() {
            d.io_done(self);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{BdevIo, IoType};
    use crate::dma::DmaBuf;

    /// A vectored request owns its buffers: what goes in through `copy_in`,
    /// `zero` and `segments_mut` (across segment boundaries) comes back out
    /// in them, in order, through `take_bufs`.
    #[test]
    fn vectored_memory_is_owned_and_given_back() {
        let bufs = vec![
            DmaBuf::new(512).unwrap(),
            DmaBuf::new(1024).unwrap(),
            DmaBuf::new(512).unwrap(),
        ];
        let mut io = BdevIo::vectored(IoType::Read, 4096, bufs, None);
        assert_eq!(io.len, 2048);
        assert_eq!(
            io.segments().map(<[u8]>::len).collect::<Vec<_>>(),
            [512, 1024, 512]
        );
        let data: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
        io.copy_in(0, &data);
        io.zero(500, 30);
        io.segments_mut().last().unwrap()[511] = 0xee;
        let mut want = data.clone();
        want[500..530].fill(0);
        want[2047] = 0xee;
        let mut out = vec![0u8; 2000];
        io.copy_out(40, &mut out);
        assert_eq!(out, want[40..2040]);
        assert!(
            io.take_buf().is_none(),
            "a vectored request keeps its buffers"
        );
        assert_eq!(io.bufs().len(), 3);
        let back: Vec<u8> = io
            .take_bufs()
            .iter()
            .flat_map(|b| b.as_slice().to_vec())
            .collect();
        assert_eq!(back, want);
        assert_eq!(io.segments().count(), 0, "no memory left in the request");
    }

    /// A recycled box comes back as the thread's next request, with nothing
    /// of the old one (a keeper, a target, buffers) held or seen.
    #[test]
    fn recycled_box_is_reused_empty() {
        use std::sync::Arc;
        let keeper: Arc<dyn std::any::Any + Send + Sync> = Arc::new(7u32);
        let mut page = vec![0u8; 4096];
        let segs = [(page.as_mut_ptr(), page.len())];
        // SAFETY: `page` outlives the request and nothing else uses it meanwhile.
        let mut io =
            unsafe { BdevIo::over_foreign(IoType::Read, 8192, &segs, keeper.clone(), None) };
        io.tag = 99;
        io.fua = true;
        io.status = super::IoStatus::Eio;
        let at = &*io as *const BdevIo;
        assert_eq!(Arc::strong_count(&keeper), 2);
        io.recycle();
        assert_eq!(
            Arc::strong_count(&keeper),
            1,
            "recycling lets go of the keeper"
        );
        let io = BdevIo::new(IoType::Flush, 0, 0, None, None);
        assert_eq!(
            &*io as *const BdevIo, at,
            "the box comes back from the pool"
        );
        assert_eq!(
            (io.tag, io.fua, io.status, io.len, io.segments().count()),
            (0, false, super::IoStatus::Pending, 0, 0)
        );
        let io2 = BdevIo::read(0, DmaBuf::new(512).unwrap(), None);
        assert_ne!(&*io2 as *const BdevIo, at);
        assert_eq!(io2.len, 512);
        io2.recycle();
        io.recycle();
    }

    /// The pool keeps at most `POOL_MAX` boxes; more are freed.
    #[test]
    fn pool_is_bounded() {
        let many: Vec<_> = (0..super::POOL_MAX + 10)
            .map(|_| BdevIo::new(IoType::Flush, 0, 0, None, None))
            .collect();
        for io in many {
            io.recycle();
        }
        assert_eq!(super::POOL.with(|p| p.borrow().len()), super::POOL_MAX);
    }

    /// A sub-request sees exactly its range of the parent's memory.
    #[test]
    fn sub_io_covers_its_range_of_the_parent() {
        let bufs = vec![DmaBuf::new(512).unwrap(), DmaBuf::new(512).unwrap()];
        let mut parent = BdevIo::vectored(IoType::Read, 0, bufs, None);
        // SAFETY: the parent outlives the sub-request and nothing else touches
        // its bytes [300, 700) while the sub-request exists.
        let mut sub = unsafe { BdevIo::sub_io(&parent, 300, 400, IoType::Read, 0, None) };
        assert_eq!(
            sub.segments().map(<[u8]>::len).collect::<Vec<_>>(),
            [212, 188]
        );
        sub.copy_in(0, &[7u8; 400]);
        drop(sub);
        let mut all = vec![0u8; 1024];
        parent.copy_out(0, &mut all);
        assert!(all[..300].iter().all(|&b| b == 0));
        assert!(all[300..700].iter().all(|&b| b == 7));
        assert!(all[700..].iter().all(|&b| b == 0));
        assert_eq!(parent.take_bufs().len(), 2);
    }
}

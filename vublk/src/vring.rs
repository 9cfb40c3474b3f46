//! One virtqueue served on one reactor: a poller pops the guest's descriptor
//! chains, turns each into a bdev request over the guest's own pages (no copy),
//! and on completion writes the status byte; at the end of the poll the chains
//! completed go to the used ring with one index update, and the call eventfd is
//! signalled when the guest wants to hear (`EVENT_IDX`: the private `used`
//! module).
//!
//! The kick eventfd is in the reactor's wake set, so a parked reactor wakes on a
//! guest's kick; while it runs, the poller reads the avail ring every iteration
//! and drains the kick fd. Nothing here blocks.
//!
//! One poll does a batch's whole round trip: it pops every available chain,
//! kicks the channel ([`bdev::Channel::kick`]: the io_uring is entered now, and
//! buffered reads the page cache holds complete inside that), completes what
//! came back, and signals the guest once for all of it: one reactor iteration
//! for a batch rather than one to pop, one for the channel to submit and reap,
//! and the call eventfd after that.
//!
//! A poll reads the avail index once (acquire) and the heads it covers from
//! the avail ring as one slice; a chain of direct descriptors is read
//! straight from the descriptor table (one slice of guest memory per poll,
//! `walk_direct`, a volatile load per descriptor); anything else (an indirect
//! table, a chain `virtio-queue` would cut short, a ring outside one region)
//! is left to `virtio-queue`'s own pop and walk of the same entry, so both
//! read the same chain.
//!
//! With interrupt coalescing on ([`crate::coalesce`], SPDK's
//! `vhost_controller_set_coalescing`), a busy queue's signal may be held back
//! for a while after the previous one; while one is held the reactor does not
//! park, and the first poll after its time sends it (a stopping ring sends it
//! at once). A poll that sends a held signal counts as busy.
//!
//! Bad input never reaches the bdev: a chain without a readable 16-byte header
//! or a writable status byte, an address outside the guest's memory, or a
//! wrong length fails the request with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an
//! unknown type); a ring the service cannot follow at all (an avail index more
//! than a queue ahead, a chain with no status byte to answer in) is marked
//! broken and the connection is shut down, which the control thread sees. The
//! other queues, connections and exports go on.
//!
//! Stopping (`GET_VRING_BASE`, a disable, a disconnect): the control thread sets
//! [`QueueCtl::stop`]; the poller pops nothing more, lets the requests in flight
//! complete into the used ring, then records the next avail index and sets
//! [`QueueCtl::done`]. The guest memory stays mapped while any request holds it.

use crate::blk::{self, req, status};
use crate::coalesce::{Coalescer, Coalescing};
use crate::memory::{GuestMem, GuestSegs};
use crate::used::UsedRing;
use bdev::{Bdev, BdevIo, IoChannel, IoDone, IoStatus, IoType};
use reactor::{AwakeGuard, PollStatus, PollerHandle};
use slab::Slab;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};

/// Reads the chain at `head` from the descriptor table `table` (of `size`
/// entries) into `out` as (address, length, writable), when it is a chain of
/// direct descriptors that `virtio-queue`'s walk takes whole; `false` (with
/// `out` partly filled) for anything that walk must judge (an indirect table,
/// an index out of the table, a chain as long as the queue or of more than
/// 4 GiB), so that the chain is the same whichever reads it.
fn walk_direct<B: BitmapSlice>(
    table: &VolatileSlice<'_, B>,
    head: u16,
    size: u16,
    out: &mut Vec<(u64, u32, bool)>,
) -> bool {
    let (mut i, mut ttl, mut total) = (head, size, 0u64);
    loop {
        if ttl == 0 || i >= size {
            return false;
        }
        // One volatile load of the 16 bytes (`read_obj` copies them through
        // a general byte copy).
        let Ok(d) = table.get_ref::<Descriptor>(usize::from(i) * 16) else {
            return false;
        };
        let d = d.load();
        total += u64::from(d.len());
        if d.refers_to_indirect_table() || total > u64::from(u32::MAX) {
            return false;
        }
        out.push((d.addr().0, d.len(), d.is_write_only()));
        if !d.has_next() {
            return true;
        }
        i = d.next();
        ttl -= 1;
    }
}

/// The worker behind its cell (the completion target of its requests).
struct Cell(RefCell<Worker>);
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory, VolatileSlice};

/// What the export's queues share (one per connection).
pub struct DevShared {
    /// The exported node (a device, which follows snapshots and pivots).
    pub bdev: Arc<dyn Bdev>,
    /// Whether writes are allowed.
    pub writable: bool,
    /// The guest's cache mode: writeback (flushes make data durable) or, when
    /// the guest clears it, write-through (every write durable, sent with FUA).
    pub writeback: AtomicBool,
    /// What `GET_ID` returns (zero-padded).
    pub id: [u8; blk::ID_BYTES],
    /// A clone of the connection's socket, shut down when a queue breaks.
    pub conn: UnixStream,
    /// Requests completed over this connection (for the statistics).
    pub completed: AtomicU64,
    /// The export's interrupt coalescing settings.
    pub coalescing: Arc<Coalescing>,
}

impl DevShared {
    fn disconnect(&self, why: &str) {
        tracing::warn!(reason = why, "vhost-user-blk: dropping the connection");
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

/// The control thread's handle on a running queue.
#[derive(Default)]
pub struct QueueCtl {
    /// Set by the control thread: pop nothing more, finish what is in flight.
    pub stop: AtomicBool,
    /// Set by the reactor once stopped with nothing in flight.
    pub done: AtomicBool,
    /// The next avail index once stopped (`GET_VRING_BASE`'s answer).
    pub next_avail: AtomicU16,
}

/// A queue's setup, from the control thread.
pub struct QueueSetup {
    /// The configured queue (addresses in guest physical space).
    pub queue: Queue,
    /// The guest's memory.
    pub mem: Arc<GuestMem>,
    /// The guest's kick (non-blocking).
    pub kick: File,
    /// Where to signal completions (none: the guest polls).
    pub call: Option<File>,
    /// The device's state.
    pub dev: Arc<DevShared>,
    /// The control thread's handle.
    pub ctl: Arc<QueueCtl>,
    /// For log lines.
    pub index: u16,
}

/// A request in flight.
struct Req {
    head: u16,
    status: u64,
    written: u32,
}

struct Worker {
    q: Queue,
    mem: Arc<GuestMem>,
    kick: File,
    call: Option<File>,
    dev: Arc<DevShared>,
    ctl: Arc<QueueCtl>,
    ch: Rc<IoChannel>,
    /// Completions written into the used ring once per poll (`used`).
    used: UsedRing,
    reqs: Slab<Req>,
    backlog: VecDeque<Box<BdevIo>>,
    signal: bool,
    stopping: bool,
    poller: Option<PollerHandle>,
    me: Weak<Cell>,
    index: u16,
    descs: Vec<(u64, u32, bool)>,
    segs: GuestSegs,
    polls: u32,
    /// Notifications are armed (`enable_notification` returned "nothing
    /// more") and nothing was popped since: the ring's event index or flag
    /// still says so, and an idle poll need not write it again.
    armed: bool,
    /// When the next signal may go (interrupt coalescing).
    coal: Coalescer,
    /// Held while a signal is held back, so the reactor cannot park on it.
    awake: Option<AwakeGuard>,
    /// Requests completed and not yet added to [`DevShared::completed`].
    completed: u64,
}

/// Starts serving `s` on the current reactor.
pub fn start(s: QueueSetup) -> Result<(), String> {
    let ch = bdev::channel(&s.dev.bdev).map_err(|e| format!("channel: {e}"))?;
    let coal = Coalescer::new(reactor::ticks_hz(), &s.dev.coalescing, reactor::ticks());
    reactor::register_fd(s.kick.as_raw_fd()).map_err(|e| format!("kick fd: {e}"))?;
    let used = UsedRing::new(&s.queue);
    let w = Rc::new(Cell(RefCell::new(Worker {
        used,
        q: s.queue,
        mem: s.mem,
        kick: s.kick,
        call: s.call,
        dev: s.dev,
        ctl: s.ctl,
        ch,
        reqs: Slab::new(),
        backlog: VecDeque::new(),
        signal: false,
        stopping: false,
        poller: None,
        me: Weak::new(),
        index: s.index,
        descs: Vec::new(),
        segs: GuestSegs::default(),
        polls: 0,
        armed: false,
        coal,
        awake: None,
        completed: 0,
    })));
    w.0.borrow_mut().me = Rc::downgrade(&w);
    let wp = w.clone();
    let h = reactor::register_poller("vhost-blk-queue", move || {
        let (busy, kick) = wp.0.borrow_mut().poll();
        // Outside the worker's borrow: completions come back into it.
        if let Some(ch) = kick {
            ch.kick();
        }
        let signalled = wp.0.borrow_mut().settle();
        if signalled {
            PollStatus::Busy
        } else {
            busy
        }
    });
    w.0.borrow_mut().poller = Some(h);
    Ok(())
}

impl IoDone for Cell {
    fn io_done(&self, io: Box<BdevIo>) {
        self.0.borrow_mut().complete(io);
    }
}

impl Worker {
    /// Takes what the guest made available; returns whether there was work and
    /// the channel to kick when requests went to it.
    fn poll(&mut self) -> (PollStatus, Option<Rc<IoChannel>>) {
        let mut busy = false;
        if !self.stopping && self.ctl.stop.load(Ordering::Acquire) {
            self.stopping = true;
        }
        // The kick only wakes a parked reactor (edge-triggered: every write is
        // an edge, drained or not); while running, the avail ring is read every
        // iteration, so the eventfd is drained only now and then (every 64 Ki
        // polls, some milliseconds of spinning: its counter cannot fill), not
        // with a syscall per iteration nor, as every 256 polls did, some 30,000
        // a second on a spinning reactor.
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(1 << 16) {
            let mut b = [0u8; 8];
            let _ = (&self.kick).read(&mut b);
        }
        while let Some(io) = self.backlog.pop_front() {
            if let Err(io) = self.ch.submit(io) {
                self.backlog.push_front(io);
                break;
            }
            busy = true;
        }
        if !self.stopping {
            busy |= self.pop_all();
        }
        let kick = (busy && !self.reqs.is_empty()).then(|| self.ch.clone());
        (busy.into(), kick)
    }

    /// Ends a poll: signals what completed (whether it did), and hands a
    /// stopped ring back.
    fn settle(&mut self) -> bool {
        self.count_completed();
        let signalled = self.flush_signal(self.stopping);
        if self.stopping && self.reqs.is_empty() {
            self.finish();
        }
        signalled
    }

    /// Pops every available chain (at most a queue's worth) and starts it.
    fn pop_all(&mut self) -> bool {
        let mem = self.mem.clone();
        let m = &mem.mem;
        let ahead = match self.q.avail_idx(m, Ordering::Acquire) {
            Ok(avail) => {
                let ahead = avail - std::num::Wrapping(self.q.next_avail());
                if ahead.0 > self.q.size() {
                    self.broken("avail index more than a queue ahead");
                    return false;
                }
                if ahead.0 == 0 {
                    if self.armed {
                        return false;
                    }
                    return match self.q.enable_notification(m) {
                        Ok(more) => {
                            self.armed = !more;
                            more
                        }
                        Err(_) => {
                            self.broken("cannot write the avail event");
                            false
                        }
                    };
                }
                ahead.0
            }
            Err(_) => {
                self.broken("cannot read the avail ring");
                return false;
            }
        };
        // The descriptor table as one slice (it lies in one region where the
        // guest's memory is one region, as QEMU's is): direct chains are read
        // from it without a region lookup per descriptor.
        let size = self.q.size();
        let table = m
            .get_slice(GuestAddress(self.q.desc_table()), 16 * usize::from(size))
            .ok();
        // The avail ring's entries likewise: the heads of the `ahead` chains
        // the index just read (with acquire) covers are read from it.
        let ring = m
            .get_slice(GuestAddress(self.q.avail_ring()), 4 + 2 * usize::from(size))
            .ok();
        let mut n = 0;
        while n < ahead {
            let next = self.q.next_avail();
            // (`ahead` > 0 means a queue size > 0: the remainder is defined.)
            let head = next.checked_rem(size).and_then(|i| {
                let r = ring.as_ref()?;
                r.load::<u16>(4 + 2 * usize::from(i), Ordering::Acquire)
                    .ok()
            });
            let head = head.map(u16::from_le);
            self.descs.clear();
            let head = match (head, &table) {
                (Some(h), Some(t)) if walk_direct(t, h, size, &mut self.descs) => {
                    self.q.set_next_avail(next.wrapping_add(1));
                    h
                }
                _ => {
                    // Anything else is `virtio-queue`'s to read (the same
                    // entry: the next available one).
                    let Some(chain) = self.q.pop_descriptor_chain(m) else {
                        if n == 0 {
                            // Entries are available but none reads as a chain.
                            self.broken("an available head the ring cannot hold");
                            return false;
                        }
                        break;
                    };
                    self.descs.clear();
                    let head = chain.head_index();
                    self.descs
                        .extend(chain.map(|d| (d.addr().0, d.len(), d.is_write_only())));
                    head
                }
            };
            n += 1;
            self.armed = false;
            if !self.start_request(head) || self.stopping {
                break;
            }
        }
        n > 0
    }

    fn broken(&mut self, why: &str) {
        tracing::warn!(
            queue = self.index,
            reason = why,
            "vhost-user-blk: broken virtqueue"
        );
        self.stopping = true;
        self.dev.disconnect(why);
    }

    /// Parses and starts the chain just popped (in `self.descs`); `false` if
    /// the ring is broken.
    fn start_request(&mut self, head: u16) -> bool {
        // Readable descriptors first, then writable (virtio 1.2 2.7.4.2).
        let nread = self.descs.iter().take_while(|d| !d.2).count();
        if self.descs[nread..].iter().any(|d| !d.2) {
            return self.fail_or_break(head, None, "readable descriptor after a writable one");
        }
        let status_at = match self.descs[nread..].iter().rev().find(|d| d.1 > 0) {
            Some(&(a, l, _)) => a.checked_add(u64::from(l) - 1),
            None => None,
        };
        let Some(status_at) = status_at else {
            return self.fail_or_break(head, None, "no status byte");
        };
        // The header usually starts a descriptor of its own: one slice for
        // it, else the general copy across descriptors.
        let mut hdr = [0u8; 16];
        let whole = nread > 0
            && self.descs[0].1 >= 16
            && match self.mem.mem.get_slice(GuestAddress(self.descs[0].0), 16) {
                // One volatile load of the 16 bytes.
                Ok(h) => h.get_ref::<[u8; 16]>(0).is_ok_and(|r| {
                    hdr = r.load();
                    true
                }),
                Err(_) => false,
            };
        if !whole && self.gather(0, nread, 0, &mut hdr).is_none() {
            return self.fail_or_break(head, Some(status_at), "bad request header");
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let wlen: u64 = self.descs[nread..].iter().map(|d| u64::from(d.1)).sum();
        let rlen: u64 = self.descs[..nread].iter().map(|d| u64::from(d.1)).sum();
        let (io_type, ranges_write) = match ty {
            req::IN => (IoType::Read, true),
            req::OUT => (IoType::Write, false),
            req::FLUSH => (IoType::Flush, false),
            req::GET_ID => return self.get_id(head, nread, status_at, wlen),
            req::DISCARD | req::WRITE_ZEROES => {
                return self.discard(head, ty, nread, status_at, rlen);
            }
            _ => {
                self.finish_now(head, status_at, 1, status::UNSUPP);
                return true;
            }
        };
        if io_type != IoType::Read && io_type != IoType::Flush && !self.dev.writable {
            self.finish_now(head, status_at, 1, status::IOERR);
            return true;
        }
        // The data: readable bytes after the header, or writable bytes before
        // the status byte.
        self.segs.clear();
        let (data_len, ok) = if io_type == IoType::Flush {
            (0, true)
        } else if ranges_write {
            let len = wlen - 1;
            (len, self.map_range(nread, self.descs.len(), 0, len))
        } else {
            let len = rlen.saturating_sub(16);
            (len, rlen >= 16 && self.map_range(0, nread, 16, len))
        };
        if !ok || sector.checked_mul(blk::SECTOR).is_none() {
            self.finish_now(head, status_at, 1, status::IOERR);
            return true;
        }
        if io_type != IoType::Flush && data_len == 0 {
            self.finish_now(head, status_at, 1, status::IOERR);
            return true;
        }
        let written = if ranges_write { data_len as u32 + 1 } else { 1 };
        let key = self.reqs.insert(Req {
            head,
            status: status_at,
            written,
        });
        let done = self.me.upgrade().map(|w| w as Rc<dyn IoDone>);
        let mut io = match io_type {
            IoType::Flush => BdevIo::new(IoType::Flush, 0, 0, None, done),
            _ => match self
                .mem
                .request(io_type, sector * blk::SECTOR, &self.segs, done)
            {
                Some(io) => io,
                None => {
                    self.reqs.remove(key);
                    self.finish_now(head, status_at, 1, status::IOERR);
                    return true;
                }
            },
        };
        io.tag = key as u64;
        io.fua = io_type == IoType::Write && !self.dev.writeback.load(Ordering::Relaxed);
        if !self.backlog.is_empty() {
            self.backlog.push_back(io);
        } else if let Err(io) = self.ch.submit(io) {
            self.backlog.push_back(io);
        }
        true
    }

    /// Answers a malformed chain with IOERR where it has a status byte, else
    /// breaks the ring.
    fn fail_or_break(&mut self, head: u16, status_at: Option<u64>, why: &str) -> bool {
        tracing::debug!(
            queue = self.index,
            reason = why,
            "vhost-user-blk: bad request"
        );
        match status_at {
            Some(s) => {
                self.finish_now(head, s, 1, status::IOERR);
                true
            }
            None => {
                self.broken(why);
                false
            }
        }
    }

    /// Copies bytes `[skip, skip+out.len())` of descriptors `from..to` into `out`.
    fn gather(&self, from: usize, to: usize, mut skip: u64, out: &mut [u8]) -> Option<()> {
        let mut at = 0;
        for &(a, l, _) in &self.descs[from..to] {
            if at == out.len() {
                break;
            }
            let l = u64::from(l);
            if skip >= l {
                skip -= l;
                continue;
            }
            let take = ((l - skip) as usize).min(out.len() - at);
            self.mem
                .mem
                .read_slice(&mut out[at..at + take], GuestAddress(a.checked_add(skip)?))
                .ok()?;
            at += take;
            skip = 0;
        }
        (at == out.len()).then_some(())
    }

    /// Maps `len` bytes of descriptors `from..to`, from byte `skip` on, into `self.segs`.
    fn map_range(&mut self, from: usize, to: usize, mut skip: u64, mut len: u64) -> bool {
        for i in from..to {
            if len == 0 {
                break;
            }
            let (a, l, _) = self.descs[i];
            let l = u64::from(l);
            if skip >= l {
                skip -= l;
                continue;
            }
            let take = (l - skip).min(len);
            let Some(start) = a.checked_add(skip) else {
                return false;
            };
            if !self.mem.host_segments(start, take, &mut self.segs) {
                return false;
            }
            len -= take;
            skip = 0;
        }
        len == 0
    }

    fn get_id(&mut self, head: u16, nread: usize, status_at: u64, wlen: u64) -> bool {
        let n = (wlen - 1).min(blk::ID_BYTES as u64) as usize;
        let id = self.dev.id;
        let mut at = 0;
        for i in nread..self.descs.len() {
            if at == n {
                break;
            }
            let (a, l, _) = self.descs[i];
            let take = (l as usize).min(n - at);
            if self
                .mem
                .mem
                .write_slice(&id[at..at + take], GuestAddress(a))
                .is_err()
            {
                self.finish_now(head, status_at, 1, status::IOERR);
                return true;
            }
            at += take;
        }
        self.finish_now(head, status_at, n as u32 + 1, status::OK);
        true
    }

    fn discard(&mut self, head: u16, ty: u32, nread: usize, status_at: u64, rlen: u64) -> bool {
        if !self.dev.writable {
            self.finish_now(head, status_at, 1, status::IOERR);
            return true;
        }
        // Exactly one segment (max_discard_seg = max_write_zeroes_seg = 1).
        let mut seg = [0u8; 16];
        if rlen != 32 {
            self.finish_now(head, status_at, 1, status::UNSUPP);
            return true;
        }
        if self.gather(0, nread, 16, &mut seg).is_none() {
            self.finish_now(head, status_at, 1, status::IOERR);
            return true;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let (io_type, max, allowed) = if ty == req::DISCARD {
            (IoType::Unmap, blk::MAX_DISCARD_SECTORS, 0)
        } else {
            (
                IoType::WriteZeroes,
                blk::MAX_WRITE_ZEROES_SECTORS,
                blk::WZ_FLAG_UNMAP,
            )
        };
        if flags & !allowed != 0 {
            self.finish_now(head, status_at, 1, status::UNSUPP);
            return true;
        }
        if num == 0 || num > max || sector.checked_mul(blk::SECTOR).is_none() {
            self.finish_now(head, status_at, 1, status::IOERR);
            return true;
        }
        let key = self.reqs.insert(Req {
            head,
            status: status_at,
            written: 1,
        });
        let done = self.me.upgrade().map(|w| w as Rc<dyn IoDone>);
        let mut io = BdevIo::new(
            io_type,
            sector * blk::SECTOR,
            u64::from(num) * blk::SECTOR,
            None,
            done,
        );
        io.tag = key as u64;
        if !self.backlog.is_empty() {
            self.backlog.push_back(io);
        } else if let Err(io) = self.ch.submit(io) {
            self.backlog.push_back(io);
        }
        true
    }

    /// Completes a chain at once (no bdev request).
    fn finish_now(&mut self, head: u16, status_at: u64, written: u32, st: u8) {
        // One slice for the byte (a plain `write_obj` walks the general
        // access path for it); an address outside memory writes nothing, as
        // before.
        if let Ok(s) = self.mem.mem.get_slice(GuestAddress(status_at), 1) {
            if let Ok(r) = s.get_ref::<u8>(0) {
                r.store(st);
            }
        }
        self.used.push(head, written);
        self.coal.completed(1);
        self.signal = true;
    }

    fn complete(&mut self, io: Box<BdevIo>) {
        let ok = io.status == IoStatus::Success;
        let key = io.tag as usize;
        // Lets go of the guest mapping and keeps the box for the next request.
        io.recycle();
        let Some(r) = self.reqs.try_remove(key) else {
            return;
        };
        let st = if ok { status::OK } else { status::IOERR };
        self.completed += 1;
        self.finish_now(r.head, r.status, if ok { r.written } else { 1 }, st);
        if self.stopping {
            self.flush_signal(true);
            if self.reqs.is_empty() {
                self.finish();
            }
        }
    }

    /// Signals the guest if completions are waiting, it wants to hear and
    /// coalescing lets it go now (or `now` says so); whether it wrote the call
    /// eventfd. A signal held back keeps the reactor awake until it goes.
    fn flush_signal(&mut self, now: bool) -> bool {
        if self.used.publish(&mut self.q, &self.mem.mem).is_err() {
            self.broken("cannot write the used ring");
        }
        if !self.signal {
            return false;
        }
        if !self.coal.due(&self.dev.coalescing, reactor::ticks()) && !now {
            if self.awake.is_none() {
                self.awake = Some(reactor::keep_awake());
            }
            return false;
        }
        self.awake = None;
        self.signal = false;
        let Some(call) = &self.call else {
            return false;
        };
        if !self
            .used
            .needs_notification(&self.q, &self.mem.mem)
            .unwrap_or(true)
        {
            return false;
        }
        let _ = (&*call).write(&1u64.to_ne_bytes());
        if self.coal.enabled() {
            // The write may be long (it wakes the guest's vCPU): time after it.
            self.coal.signalled(reactor::ticks());
        }
        true
    }

    /// Adds the completions counted since the last time to the connection's
    /// statistics (one atomic add per poll, not per request).
    fn count_completed(&mut self) {
        if self.completed > 0 {
            self.dev
                .completed
                .fetch_add(std::mem::take(&mut self.completed), Ordering::Relaxed);
        }
    }

    /// Stopped with nothing in flight: hands the ring back to the control thread.
    fn finish(&mut self) {
        self.count_completed();
        self.flush_signal(true);
        self.awake = None;
        if let Some(p) = self.poller.take() {
            p.unregister();
            let _ = reactor::unregister_fd(self.kick.as_raw_fd());
            self.ctl
                .next_avail
                .store(self.q.next_avail(), Ordering::Release);
            self.ctl.done.store(true, Ordering::Release);
        }
    }
}

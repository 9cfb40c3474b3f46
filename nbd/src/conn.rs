//! One NBD connection on a reactor: the handshake, then the transmission phase
//! as a poll-driven state machine. Requests are parsed as they arrive and
//! submitted at once (many in flight), replies go out as requests complete, in
//! any order, gathered into few `writev` calls; nothing blocks and no thread is
//! dedicated to the connection.

use super::export::Kick;
use super::handshake::{self, HandshakeError, Negotiated};
use super::net::{AsyncSock, Registration, Sock};
use super::pool;
use super::proto::{
    self, cflags, chunk, cmd, errno, Head, Request, BASE_ALLOCATION_ID, MAX_PAYLOAD, REQUEST_LEN,
};
use super::server::ConnSlot;
use super::status;
use bdev::{Bdev, BdevIo, DmaBuf, IoChannel, IoDone, IoStatus, IoType};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice, Read, Write};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Longest a client may take over the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a stop request, how long replies may wait for a client that does not read.
const KICK_GRACE: Duration = Duration::from_secs(5);
/// Receive buffer.
const RX_BUF: usize = 256 * 1024;
/// Requests in flight per connection before reading pauses.
const MAX_INFLIGHT: usize = 512;
/// Reply bytes queued per connection before reading pauses.
const MAX_OUT_BYTES: usize = 64 << 20;
/// Slices per `writev`.
const MAX_IOV: usize = 128;
/// Emulated write-zeroes: chunk size and chunks in flight per request.
const ZERO_CHUNK: u64 = 1 << 20;
const ZERO_WINDOW: u32 = 8;

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(sock: Sock, slot: ConnSlot) {
    let peer = sock.peer();
    let mut s = match AsyncSock::new(sock) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "NBD connection cannot be polled");
            return;
        }
    };
    let kick = slot.kick.clone();
    poll_fn(|cx| {
        kick.set_waker(cx.waker());
        Poll::Ready(())
    })
    .await;
    let inst = slot.inst.clone();
    let neg = {
        let hs = pin!(handshake::negotiate(&mut s, &inst, &kick));
        bounded(hs, HANDSHAKE_TIMEOUT, &kick).await
    };
    match neg {
        Some(Ok(n)) => {
            tracing::debug!(%peer, export = %n.attached.export().cfg.name, structured = n.structured, "NBD client attached");
            match Transmission::new(s, n, kick) {
                Ok(mut t) => poll_fn(|cx| t.step(cx)).await,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "NBD export has no channel on this reactor")
                }
            }
            tracing::debug!(%peer, "NBD client gone");
        }
        Some(Err(HandshakeError::Aborted)) => {
            tracing::debug!(%peer, "NBD client aborted the handshake")
        }
        Some(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "NBD handshake ended")
        }
        Some(Err(e)) => tracing::info!(%peer, error = %e, "NBD handshake failed"),
        None if kick.is_set() => tracing::debug!(%peer, "NBD handshake stopped: server closing"),
        None => tracing::info!(%peer, "NBD handshake timed out"),
    }
    drop(slot);
}

/// Runs `f` until it finishes, `limit` passes or `kick` is set.
async fn bounded<F: Future + Unpin>(mut f: F, limit: Duration, kick: &Kick) -> Option<F::Output> {
    let mut sleep = reactor::sleep(limit);
    poll_fn(|cx| {
        if kick.is_set() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(v) = Pin::new(&mut f).poll(cx) {
            return Poll::Ready(Some(v));
        }
        if Pin::new(&mut sleep).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A finished block-status query: the request's slot and its payload or errno.
type StatusDone = (usize, Result<Vec<u8>, u32>);

/// What completions hand back to the connection task (same reactor).
#[derive(Default)]
struct Shared {
    // Requests travel as `Box<BdevIo>` (the bdev API); they are moved, not copied.
    #[allow(clippy::vec_box)]
    ios: RefCell<Vec<Box<BdevIo>>>,
    status: RefCell<Vec<StatusDone>>,
    space: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Shared {
    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }
}

impl IoDone for Shared {
    #[inline]
    fn io_done(&self, io: Box<BdevIo>) {
        self.ios.borrow_mut().push(io);
        self.wake();
    }
}

/// A request being served.
struct Rec {
    cookie: u64,
    cmd: u16,
    offset: u64,
    pending: u32,
    status: IoStatus,
    data: Option<DmaBuf>,
    zero_next: u64,
    zero_end: u64,
    fua: bool,
}

impl Rec {
    fn new(r: &Request, pending: u32) -> Rec {
        Rec {
            cookie: r.cookie,
            cmd: r.cmd,
            offset: r.offset,
            pending,
            status: IoStatus::Success,
            data: None,
            zero_next: 0,
            zero_end: 0,
            fua: r.flags & cflags::FUA != 0,
        }
    }
}

/// A write's payload being received, or one being thrown away.
enum Payload {
    Write {
        req: Request,
        buf: DmaBuf,
        got: usize,
    },
    Discard {
        req: Request,
        left: u64,
        errno: u32,
        msg: &'static str,
    },
}

enum Body {
    None,
    Dma(DmaBuf),
    Bytes(Vec<u8>),
}

impl Body {
    #[inline]
    fn bytes(&self) -> &[u8] {
        match self {
            Body::None => &[],
            Body::Dma(b) => b.as_slice(),
            Body::Bytes(v) => v,
        }
    }
}

/// One reply (or reply chunk) waiting to be sent.
struct Out {
    head: Head,
    body: Body,
}

impl Out {
    #[inline]
    fn size(&self) -> usize {
        self.head.bytes().len() + self.body.bytes().len()
    }
    fn recycle(self) {
        if let Body::Dma(b) = self.body {
            pool::put(b);
        }
    }
}

/// The transmission phase of one connection.
struct Transmission {
    // Declared before `sock`: deregistered while the fd is still open.
    reg: Registration,
    sock: Sock,
    _attached: super::export::Attached,
    bdev: Arc<dyn Bdev>,
    ch: Rc<IoChannel>,
    kick: Arc<Kick>,
    shared: Rc<Shared>,
    done: Rc<dyn IoDone>,
    structured: bool,
    base_allocation: bool,
    writable: bool,
    writethrough: bool,
    size: u64,
    block_mask: u64,
    can_flush: bool,
    can_trim: bool,
    can_zero: bool,
    recs: Slab<Rec>,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    payload: Option<Payload>,
    out: VecDeque<Out>,
    out_off: usize,
    out_bytes: usize,
    pending_submit: VecDeque<Box<BdevIo>>,
    waiting_space: bool,
    #[allow(clippy::vec_box)]
    reap_buf: Vec<Box<BdevIo>>,
    accepting: bool,
    eof: bool,
    broken: bool,
    wakers_set: bool,
    kick_deadline: Option<reactor::Sleep>,
}

impl Transmission {
    fn new(s: AsyncSock, n: Negotiated, kick: Arc<Kick>) -> Result<Transmission, bdev::BdevError> {
        let export = n.attached.export().clone();
        let bdev = export.bdev.clone();
        let ch = bdev::channel(&bdev)?;
        let shared = Rc::new(Shared::default());
        let done: Rc<dyn IoDone> = shared.clone();
        let AsyncSock { reg, sock } = s;
        Ok(Transmission {
            reg,
            sock,
            structured: n.structured,
            base_allocation: n.base_allocation,
            writable: export.cfg.writable,
            writethrough: export.cfg.writethrough,
            size: bdev.size(),
            block_mask: bdev.block_size().max(1) as u64 - 1,
            can_flush: bdev.io_type_supported(IoType::Flush),
            can_trim: bdev.io_type_supported(IoType::Unmap),
            can_zero: bdev.io_type_supported(IoType::WriteZeroes),
            _attached: n.attached,
            bdev,
            ch,
            kick,
            shared,
            done,
            recs: Slab::with_capacity(64),
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            payload: None,
            out: VecDeque::with_capacity(64),
            out_off: 0,
            out_bytes: 0,
            pending_submit: VecDeque::new(),
            waiting_space: false,
            reap_buf: Vec::with_capacity(64),
            accepting: true,
            eof: false,
            broken: false,
            wakers_set: false,
            kick_deadline: None,
        })
    }

    /// Does everything that can be done now; `Ready` once the connection is over.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.wakers_set {
            *self.shared.waker.borrow_mut() = Some(cx.waker().clone());
            self.reg.set_waker(cx.waker());
            self.kick.set_waker(cx.waker());
            self.wakers_set = true;
        }
        loop {
            if self.kick.is_set() && self.kick_deadline.is_none() {
                self.accepting = false;
                self.kick_deadline = Some(reactor::sleep(KICK_GRACE));
            }
            if self.shared.space.replace(false) {
                self.waiting_space = false;
                self.retry_submits();
            }
            self.reap();
            self.reap_status();
            self.parse();
            self.fill();
            self.flush_out();
            if let Some(d) = self.kick_deadline.as_mut() {
                if Pin::new(d).poll(cx).is_ready() && !self.out.is_empty() {
                    tracing::info!("NBD client does not read its replies; dropping them");
                    self.set_broken();
                }
            }
            if self.finished() {
                return Poll::Ready(());
            }
            let more = !self.shared.ios.borrow().is_empty()
                || !self.shared.status.borrow().is_empty()
                || self.shared.space.get();
            if !more {
                return Poll::Pending;
            }
        }
    }

    fn finished(&self) -> bool {
        self.recs.is_empty()
            && self.pending_submit.is_empty()
            && (self.out.is_empty() || self.broken)
            && (self.eof || !self.accepting)
    }

    #[inline]
    fn backpressured(&self) -> bool {
        self.recs.len() >= MAX_INFLIGHT
            || self.out_bytes >= MAX_OUT_BYTES
            || !self.pending_submit.is_empty()
    }

    /// Replies can no longer be sent. Requests the client already sent are still
    /// carried out (until end of stream), their replies dropped.
    fn set_broken(&mut self) {
        self.broken = true;
        self.out_off = 0;
        self.out_bytes = 0;
        for o in self.out.drain(..) {
            o.recycle();
        }
    }

    // ---- receiving ----

    /// Reads what the socket has (edge-triggered: until it would block or a read
    /// comes back short), parsing as it goes.
    fn fill(&mut self) {
        while self.accepting && !self.eof && !self.backpressured() && self.reg.readable() {
            let direct =
                matches!(self.payload, Some(Payload::Write { .. })) && self.rx_start == self.rx_end;
            let (res, asked) = if direct {
                let Some(Payload::Write { buf, got, .. }) = self.payload.as_mut() else {
                    break;
                };
                let dst = &mut buf.as_mut_slice()[*got..];
                let asked = dst.len();
                (self.sock.read(dst), asked)
            } else {
                self.compact();
                let dst = &mut self.rx[self.rx_end..];
                let asked = dst.len();
                (self.sock.read(dst), asked)
            };
            match res {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    if direct {
                        if let Some(Payload::Write { got, .. }) = self.payload.as_mut() {
                            *got += n;
                        }
                    } else {
                        self.rx_end += n;
                    }
                    self.parse();
                    // A short read drains the socket, unless the peer hung up: the
                    // end of stream (whose edge came with these bytes) is still
                    // to be read.
                    if n < asked {
                        self.reg.clear_readable();
                        if !self.reg.readable() {
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.clear_readable();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "NBD socket read failed");
                    self.set_broken();
                    self.accepting = false;
                    break;
                }
            }
        }
    }

    fn compact(&mut self) {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx.len() - self.rx_end < 64 * 1024 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
    }

    /// Consumes buffered bytes: payloads in progress, then whole requests.
    fn parse(&mut self) {
        loop {
            if let Some(p) = self.payload.as_mut() {
                let avail = self.rx_end - self.rx_start;
                let complete = match p {
                    Payload::Write { buf, got, .. } => {
                        let n = (buf.len() - *got).min(avail);
                        buf.as_mut_slice()[*got..*got + n]
                            .copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
                        *got += n;
                        self.rx_start += n;
                        *got == buf.len()
                    }
                    Payload::Discard { left, .. } => {
                        let n = (*left).min(avail as u64);
                        *left -= n;
                        self.rx_start += n as usize;
                        *left == 0
                    }
                };
                if !complete {
                    break;
                }
                if let Some(p) = self.payload.take() {
                    self.payload_done(p);
                }
                continue;
            }
            if !self.accepting || self.backpressured() || self.rx_end - self.rx_start < REQUEST_LEN
            {
                break;
            }
            let mut hdr = [0u8; REQUEST_LEN];
            hdr.copy_from_slice(&self.rx[self.rx_start..self.rx_start + REQUEST_LEN]);
            self.rx_start += REQUEST_LEN;
            match proto::decode_request(&hdr) {
                Some(r) => self.request(r),
                None => {
                    tracing::info!("NBD request with a bad magic; closing the connection");
                    self.accepting = false;
                    break;
                }
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
    }

    /// Validates flags, range and alignment; the error to answer, if any.
    fn check(&self, r: &Request, allowed: u16) -> Option<(u32, &'static str)> {
        if r.flags & !allowed != 0 {
            return Some((errno::EINVAL, "unsupported command flags"));
        }
        if (r.cmd == cmd::READ || r.cmd == cmd::WRITE) && r.len > MAX_PAYLOAD {
            return Some((errno::EINVAL, "request larger than the maximum block size"));
        }
        let end = r.offset.checked_add(r.len as u64);
        if end.is_none_or(|e| e > self.size) {
            let e = if r.cmd == cmd::WRITE || r.cmd == cmd::WRITE_ZEROES {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Some((e, "request beyond the end of the export"));
        }
        if (r.offset | r.len as u64) & self.block_mask != 0 {
            return Some((
                errno::EINVAL,
                "request not aligned to the export's block size",
            ));
        }
        None
    }

    fn request(&mut self, mut r: Request) {
        if self.writethrough && matches!(r.cmd, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
            // A write-through export: every write is a FUA write.
            r.flags |= cflags::FUA;
        }
        match r.cmd {
            cmd::READ => {
                let allowed = cflags::FUA | if self.structured { cflags::DF } else { 0 };
                if let Some((e, m)) = self.check(&r, allowed) {
                    return self.fail(&r, e, m);
                }
                if r.len == 0 {
                    return self.ok(&r);
                }
                let Ok(buf) = pool::get(r.len as usize) else {
                    return self.fail(&r, errno::ENOMEM, "out of buffer memory");
                };
                let key = self.recs.insert(Rec::new(&r, 1));
                let mut io = BdevIo::read(r.offset, buf, Some(self.done.clone()));
                io.tag = key as u64;
                self.submit(io);
            }
            cmd::WRITE => {
                let bad = if !self.writable {
                    Some((errno::EPERM, "export is read-only"))
                } else {
                    self.check(&r, cflags::FUA)
                };
                if let Some((errno, msg)) = bad {
                    self.payload = Some(Payload::Discard {
                        req: r,
                        left: r.len as u64,
                        errno,
                        msg,
                    });
                    return;
                }
                if r.len == 0 {
                    return self.ok(&r);
                }
                self.payload = Some(match pool::get(r.len as usize) {
                    Ok(buf) => Payload::Write {
                        req: r,
                        buf,
                        got: 0,
                    },
                    Err(_) => Payload::Discard {
                        req: r,
                        left: r.len as u64,
                        errno: errno::ENOMEM,
                        msg: "out of buffer memory",
                    },
                });
            }
            cmd::DISC => {
                self.accepting = false;
            }
            cmd::FLUSH => {
                if r.flags & !cflags::FUA != 0 {
                    return self.fail(&r, errno::EINVAL, "unsupported command flags");
                }
                if !self.can_flush {
                    // Nothing volatile to make durable.
                    return self.ok(&r);
                }
                let key = self.recs.insert(Rec::new(&r, 1));
                self.submit_simple(key, IoType::Flush, 0, 0, false);
            }
            cmd::TRIM => {
                if !self.writable {
                    return self.fail(&r, errno::EPERM, "export is read-only");
                }
                if let Some((e, m)) = self.check(&r, cflags::FUA) {
                    return self.fail(&r, e, m);
                }
                if !self.can_trim {
                    return self.fail(&r, errno::EINVAL, "trim is not supported by this export");
                }
                if r.len == 0 {
                    return self.ok(&r);
                }
                let key = self.recs.insert(Rec::new(&r, 1));
                self.submit_simple(
                    key,
                    IoType::Unmap,
                    r.offset,
                    r.len as u64,
                    r.flags & cflags::FUA != 0,
                );
            }
            cmd::CACHE => {
                // Data is served from the device; there is nothing to prefetch into.
                match self.check(&r, 0) {
                    Some((e, m)) => self.fail(&r, e, m),
                    None => self.ok(&r),
                }
            }
            cmd::WRITE_ZEROES => {
                if !self.writable {
                    return self.fail(&r, errno::EPERM, "export is read-only");
                }
                if let Some((e, m)) = self.check(&r, cflags::FUA | cflags::NO_HOLE) {
                    return self.fail(&r, e, m);
                }
                if r.len == 0 {
                    return self.ok(&r);
                }
                if r.flags & cflags::NO_HOLE != 0 || !self.can_zero {
                    // Written as data: allocates, never punches a hole.
                    let mut rec = Rec::new(&r, 0);
                    rec.zero_next = r.offset;
                    rec.zero_end = r.offset + r.len as u64;
                    let key = self.recs.insert(rec);
                    self.zero_pump(key);
                    if self.recs.get(key).is_some_and(|rec| rec.pending == 0) {
                        self.finish(key);
                    }
                } else {
                    let key = self.recs.insert(Rec::new(&r, 1));
                    self.submit_simple(
                        key,
                        IoType::WriteZeroes,
                        r.offset,
                        r.len as u64,
                        r.flags & cflags::FUA != 0,
                    );
                }
            }
            cmd::BLOCK_STATUS => {
                if !self.base_allocation {
                    return self.fail(&r, errno::EINVAL, "no metadata context was selected");
                }
                if let Some((e, m)) = self.check(&r, cflags::REQ_ONE) {
                    return self.fail(&r, e, m);
                }
                if r.len == 0 {
                    return self.fail(&r, errno::EINVAL, "block status of an empty range");
                }
                let key = self.recs.insert(Rec::new(&r, 1));
                let bdev = self.bdev.clone();
                let shared = self.shared.clone();
                let one = r.flags & cflags::REQ_ONE != 0;
                reactor::spawn_local(async move {
                    let res = status::extents(&bdev, r.offset, r.len, one)
                        .await
                        .map(|ext| status::payload(BASE_ALLOCATION_ID, &ext));
                    shared.status.borrow_mut().push((key, res));
                    shared.wake();
                });
            }
            _ => self.fail(&r, errno::EINVAL, "unknown command"),
        }
    }

    fn payload_done(&mut self, p: Payload) {
        match p {
            Payload::Write { req, buf, .. } => {
                let key = self.recs.insert(Rec::new(&req, 1));
                let mut io = BdevIo::write(req.offset, buf, Some(self.done.clone()));
                io.fua = req.flags & cflags::FUA != 0;
                io.tag = key as u64;
                self.submit(io);
            }
            Payload::Discard {
                req, errno, msg, ..
            } => self.fail(&req, errno, msg),
        }
    }

    // ---- submitting ----

    fn submit_simple(&mut self, key: usize, t: IoType, offset: u64, len: u64, fua: bool) {
        let mut io = BdevIo::new(t, offset, len, None, Some(self.done.clone()));
        io.fua = fua;
        io.tag = key as u64;
        self.submit(io);
    }

    #[inline]
    fn submit(&mut self, io: Box<BdevIo>) {
        if !self.pending_submit.is_empty() {
            self.pending_submit.push_back(io);
            return;
        }
        if let Err(io) = self.ch.submit(io) {
            self.pending_submit.push_back(io);
            self.arm_space();
        }
    }

    fn retry_submits(&mut self) {
        while let Some(io) = self.pending_submit.pop_front() {
            if let Err(io) = self.ch.submit(io) {
                self.pending_submit.push_front(io);
                self.arm_space();
                return;
            }
        }
    }

    fn arm_space(&mut self) {
        if self.waiting_space {
            return;
        }
        self.waiting_space = true;
        let sh = self.shared.clone();
        self.ch.wait_for_space(Box::new(move || {
            sh.space.set(true);
            sh.wake();
        }));
    }

    /// Keeps up to `ZERO_WINDOW` zero-filled writes of an emulated write-zeroes in flight.
    fn zero_pump(&mut self, key: usize) {
        let mut ios = Vec::new();
        if let Some(rec) = self.recs.get_mut(key) {
            while rec.pending < ZERO_WINDOW && rec.zero_next < rec.zero_end && rec.status.is_ok() {
                let n = (rec.zero_end - rec.zero_next).min(ZERO_CHUNK) as usize;
                let Ok(mut buf) = pool::get(n) else {
                    rec.status = IoStatus::Nomem;
                    break;
                };
                buf.as_mut_slice().fill(0);
                let mut io = BdevIo::write(rec.zero_next, buf, Some(self.done.clone()));
                io.fua = rec.fua;
                io.tag = key as u64;
                rec.zero_next += n as u64;
                rec.pending += 1;
                ios.push(io);
            }
        }
        for io in ios {
            self.submit(io);
        }
    }

    // ---- completing ----

    fn reap(&mut self) {
        let mut batch = std::mem::take(&mut self.reap_buf);
        std::mem::swap(&mut *self.shared.ios.borrow_mut(), &mut batch);
        for mut io in batch.drain(..) {
            let key = io.tag as usize;
            let st = io.status;
            let buf = io.take_buf();
            drop(io);
            let Some(rec) = self.recs.get_mut(key) else {
                if let Some(b) = buf {
                    pool::put(b);
                }
                continue;
            };
            rec.pending = rec.pending.saturating_sub(1);
            if !st.is_ok() && rec.status.is_ok() {
                rec.status = st;
            }
            if let Some(b) = buf {
                if rec.cmd == cmd::READ && st.is_ok() {
                    rec.data = Some(b);
                } else {
                    pool::put(b);
                }
            }
            let more_zeroes = rec.zero_next < rec.zero_end && rec.status.is_ok();
            if more_zeroes {
                self.zero_pump(key);
            }
            if self.recs.get(key).is_some_and(|r| r.pending == 0) {
                self.finish(key);
            }
        }
        self.reap_buf = batch;
    }

    fn reap_status(&mut self) {
        if self.shared.status.borrow().is_empty() {
            return;
        }
        let done = std::mem::take(&mut *self.shared.status.borrow_mut());
        for (key, res) in done {
            let Some(rec) = self.recs.try_remove(key) else {
                continue;
            };
            let r = Request {
                flags: 0,
                cmd: rec.cmd,
                cookie: rec.cookie,
                offset: rec.offset,
                len: 0,
            };
            match res {
                Ok(payload) => {
                    let head = Head::chunk(
                        chunk::FLAG_DONE,
                        chunk::BLOCK_STATUS,
                        rec.cookie,
                        payload.len() as u32,
                    );
                    self.push(Out {
                        head,
                        body: Body::Bytes(payload),
                    });
                }
                Err(e) => self.fail(&r, e, "block status failed"),
            }
        }
    }

    /// All parts of a request are done: reply. (FUA went down with each part:
    /// every bdev makes a FUA request durable before it completes.)
    fn finish(&mut self, key: usize) {
        let Some(mut rec) = self.recs.try_remove(key) else {
            return;
        };
        let r = Request {
            flags: 0,
            cmd: rec.cmd,
            cookie: rec.cookie,
            offset: rec.offset,
            len: 0,
        };
        if !rec.status.is_ok() {
            if let Some(b) = rec.data.take() {
                pool::put(b);
            }
            let (e, msg) = self.errno_of(rec.status);
            return self.fail(&r, e, msg);
        }
        match rec.data.take() {
            Some(buf) => {
                let head = if self.structured {
                    Head::read_data(rec.cookie, rec.offset, buf.len() as u32)
                } else {
                    Head::simple(0, rec.cookie)
                };
                self.push(Out {
                    head,
                    body: Body::Dma(buf),
                });
            }
            None => self.ok(&r),
        }
    }

    fn errno_of(&self, st: IoStatus) -> (u32, &'static str) {
        match st {
            IoStatus::Pending | IoStatus::Success | IoStatus::Eio => (errno::EIO, "I/O error"),
            IoStatus::Enospc => (errno::ENOSPC, "no space left on the device"),
            IoStatus::Einval => (errno::EINVAL, "invalid request"),
            IoStatus::Unsupported if self.structured => (errno::ENOTSUP, "operation not supported"),
            IoStatus::Unsupported => (errno::EINVAL, "operation not supported"),
            IoStatus::Nomem => (errno::ENOMEM, "out of memory"),
            IoStatus::Aborted if self.kick.is_set() => {
                (errno::ESHUTDOWN, "server is shutting down")
            }
            IoStatus::Aborted => (errno::EIO, "request aborted"),
            IoStatus::ReadOnly => (errno::EPERM, "device is read-only"),
        }
    }

    // ---- replying ----

    fn ok(&mut self, r: &Request) {
        let head = if r.cmd == cmd::READ && self.structured {
            Head::chunk(chunk::FLAG_DONE, chunk::NONE, r.cookie, 0)
        } else {
            Head::simple(0, r.cookie)
        };
        self.push(Out {
            head,
            body: Body::None,
        });
    }

    fn fail(&mut self, r: &Request, e: u32, msg: &str) {
        tracing::debug!(
            cmd = r.cmd,
            offset = r.offset,
            errno = e,
            msg,
            "NBD request failed"
        );
        if self.structured {
            let p = proto::error_payload(e, msg);
            let head = Head::chunk(chunk::FLAG_DONE, chunk::ERROR, r.cookie, p.len() as u32);
            self.push(Out {
                head,
                body: Body::Bytes(p),
            });
        } else {
            self.push(Out {
                head: Head::simple(e, r.cookie),
                body: Body::None,
            });
        }
    }

    #[inline]
    fn push(&mut self, o: Out) {
        if self.broken {
            return o.recycle();
        }
        self.out_bytes += o.size();
        self.out.push_back(o);
    }

    /// Sends queued replies, many per `writev`, until done or the socket is full.
    fn flush_out(&mut self) {
        while !self.out.is_empty() && !self.broken && self.reg.writable() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            let mut total = 0;
            let mut skip = self.out_off;
            'gather: for o in self.out.iter() {
                for part in [o.head.bytes(), o.body.bytes()] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    iov[n] = IoSlice::new(&part[skip..]);
                    total += part.len() - skip;
                    skip = 0;
                    n += 1;
                    if n == MAX_IOV {
                        break 'gather;
                    }
                }
            }
            match self.sock.write_vectored(&iov[..n]) {
                Ok(0) => {
                    self.set_broken();
                    break;
                }
                Ok(w) => {
                    let mut adv = self.out_off + w;
                    while let Some(front) = self.out.front() {
                        let sz = front.size();
                        if adv < sz {
                            break;
                        }
                        adv -= sz;
                        self.out_bytes -= sz;
                        if let Some(o) = self.out.pop_front() {
                            o.recycle();
                        }
                    }
                    self.out_off = adv;
                    if w < total {
                        self.reg.clear_writable();
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reg.clear_writable();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "NBD socket write failed");
                    self.set_broken();
                    break;
                }
            }
        }
    }
}

impl Drop for Transmission {
    fn drop(&mut self) {
        for o in self.out.drain(..) {
            o.recycle();
        }
        self.sock.shutdown();
    }
}

//! One connection of an NBD client, living on one reactor: requests queue
//! (bounded: a full queue is back-pressure), a writer sends them pipelined
//! with a cookie each, a reader matches the replies (simple or structured,
//! in any order) and completes the requests on this reactor.
//!
//! A supervisor task owns the socket. When the connection breaks (the server
//! went away, or answered garbage: the connection is dropped, never trusted
//! again), the requests in flight go back to the front of the queue and the
//! supervisor reconnects, with the same handshake, for `reconnect-delay`;
//! they are sent again once it succeeds. After that delay (at once when it is
//! 0) every queued request fails with EIO, and so do new ones until a
//! reconnection succeeds (attempts go on in the background).
//!
//! Background requests ([`BdevIo::background`]: a job's bulk copy) queue
//! apart: the writer sends every queued foreground request first, and sends
//! a background one only when the reactor's [`Gate`] for the bdev (shared
//! with its other connections) lets it: while a client is busy, one at a
//! time over all of them (`gate.rs`), so a client's read waits behind little
//! job data in the socket and at the server.
//!
//! Nothing here holds a `RefCell` borrow across an `await` or while a request
//! completes (a completion may submit again).

use super::config::ClientConfig;
use super::connect::connect_to;
use super::gate::Gate;
use super::handshake::{negotiate, ExportInfo, HandshakeError};
use crate::net::{AsyncSock, Sock};
use crate::proto::{self, be16, be32, be64, cflags, chunk, cmd, errno, state, tflags};
use bdev::{BdevIo, IoStatus, IoType, RangeStatus};
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io::{self, Read};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Requests queued or in flight on one connection before `submit` pushes back.
pub const MAX_REQUESTS: usize = 128;
/// Longest the handshake of a reconnection may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of replies read ahead.
const INPUT_BUF: usize = 64 << 10;
/// Largest payload of a chunk other than data (errors, block status).
const MAX_META_PAYLOAD: u32 = 1 << 20;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
const OFFSET_HOLE: u16 = 2;

/// Counters a bdev shares with its connections.
#[derive(Default, Debug)]
pub struct Counters {
    /// Data bytes received in read replies.
    pub bytes_read: AtomicU64,
    /// Successful reconnections.
    pub reconnects: AtomicU64,
    /// Connections dropped (server gone or protocol violation).
    pub drops: AtomicU64,
}

/// A block-status answer.
type StatusTx = oneshot::Sender<Result<RangeStatus, IoStatus>>;

enum Kind {
    Io(Box<BdevIo>),
    Status { offset: u64, len: u32, tx: StatusTx },
}

struct Pending {
    kind: Kind,
    /// A background request (counted in the gate once sent).
    bg: bool,
    /// The flush that makes an earlier FUA write durable on a server without FUA.
    flush_stage: bool,
}

struct Inflight {
    p: Pending,
    cmd: u16,
    offset: u64,
    len: u32,
    error: Option<IoStatus>,
    status: Option<RangeStatus>,
}

/// One connection and its queue.
pub struct Conn {
    name: String,
    cfg: Arc<ClientConfig>,
    info: Cell<ExportInfo>,
    counters: Arc<Counters>,
    /// Foreground requests to send.
    queue: RefCell<VecDeque<Pending>>,
    /// Background requests to send (after the foreground ones).
    bg_queue: RefCell<VecDeque<Pending>>,
    inflight: RefCell<HashMap<u64, Inflight>>,
    /// Shared with the reactor's other connections of the bdev.
    gate: Rc<Gate>,
    /// A session is running (connected and negotiated).
    up: Cell<bool>,
    next_cookie: Cell<u64>,
    writer_waker: RefCell<Option<Waker>>,
    space: RefCell<Vec<Box<dyn FnOnce()>>>,
    failing: Cell<bool>,
    closed: Cell<bool>,
}

/// Connects and negotiates, bounded by [`HANDSHAKE_TIMEOUT`].
pub async fn connect_and_negotiate(
    cfg: &ClientConfig,
) -> Result<(AsyncSock, ExportInfo), HandshakeError> {
    let work = async {
        let mut s = connect_to(&cfg.server).await.map_err(HandshakeError::Io)?;
        let tls = cfg.tls_session().map_err(HandshakeError::Refused)?;
        let info = negotiate(&mut s, cfg.export_name(), tls).await?;
        Ok((s, info))
    };
    let timeout = reactor::sleep(HANDSHAKE_TIMEOUT);
    match futures::future::select(Box::pin(work), timeout).await {
        futures::future::Either::Left((r, _)) => r,
        futures::future::Either::Right(_) => Err(HandshakeError::Protocol(
            "the server did not finish the handshake in time".into(),
        )),
    }
}

fn wire_status(e: u32) -> IoStatus {
    match e {
        errno::EPERM => IoStatus::ReadOnly,
        errno::ENOMEM => IoStatus::Nomem,
        errno::EINVAL | errno::EOVERFLOW => IoStatus::Einval,
        errno::ENOSPC => IoStatus::Enospc,
        errno::ENOTSUP => IoStatus::Unsupported,
        _ => IoStatus::Eio,
    }
}

fn garbage(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

impl Conn {
    /// Starts a connection on the current reactor: `first`, a socket already
    /// negotiated (with `info`), or none (it connects). It joins `gate`.
    pub fn start(
        name: String,
        cfg: Arc<ClientConfig>,
        info: ExportInfo,
        counters: Arc<Counters>,
        first: Option<Sock>,
        gate: Rc<Gate>,
    ) -> Rc<Conn> {
        let c = Rc::new(Conn {
            name,
            cfg,
            info: Cell::new(info),
            counters,
            queue: RefCell::new(VecDeque::new()),
            bg_queue: RefCell::new(VecDeque::new()),
            inflight: RefCell::new(HashMap::new()),
            gate,
            up: Cell::new(false),
            next_cookie: Cell::new(1),
            writer_waker: RefCell::new(None),
            space: RefCell::new(Vec::new()),
            failing: Cell::new(false),
            closed: Cell::new(false),
        });
        c.gate.register(&c);
        reactor::spawn_local(supervise(c.clone(), first)).detach();
        c
    }

    /// The gate this connection shares.
    pub fn gate(&self) -> Rc<Gate> {
        self.gate.clone()
    }

    /// Stops the connection (its task sends `NBD_CMD_DISC` and exits).
    pub fn close(&self) {
        self.closed.set(true);
        self.wake_writer();
    }

    fn load(&self) -> usize {
        self.queue.borrow().len() + self.bg_queue.borrow().len() + self.inflight.borrow().len()
    }

    /// Whether `submit` would push back.
    pub fn is_full(&self) -> bool {
        self.load() >= MAX_REQUESTS
    }

    /// Connected, and not failing requests.
    pub fn is_up(&self) -> bool {
        self.up.get() && !self.failing.get() && !self.closed.get()
    }

    /// The next request to send: a foreground one, else a background one
    /// if the gate lets it go.
    fn next_to_send(&self) -> Option<Pending> {
        if let Some(p) = self.queue.borrow_mut().pop_front() {
            return Some(p);
        }
        if self.bg_queue.borrow().is_empty() || !self.gate.may_send_bg() {
            return None;
        }
        let p = self.bg_queue.borrow_mut().pop_front()?;
        self.gate.bg_start();
        Some(p)
    }

    /// A background request left the wire (answered, failed or taken back):
    /// every connection of the gate looks at its queue again.
    fn bg_ended(&self) {
        for c in self.gate.bg_end() {
            if !c.bg_queue.borrow().is_empty() {
                c.wake_writer();
            }
        }
    }

    /// Queues `p` at the back (`front`: the front) of its class's queue.
    fn enqueue(&self, p: Pending, front: bool) {
        let mut q = if p.bg {
            self.bg_queue.borrow_mut()
        } else {
            self.queue.borrow_mut()
        };
        if front {
            q.push_front(p);
        } else {
            q.push_back(p);
        }
    }

    fn wake_writer(&self) {
        let w = self.writer_waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Queues a request. `Err(io)`: the queue is full.
    pub fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if self.failing.get() || self.closed.get() {
            bdev::complete_deferred(io, IoStatus::Eio);
            return Ok(());
        }
        if self.load() >= MAX_REQUESTS {
            return Err(io);
        }
        let bg = io.background;
        if !bg {
            self.gate.fg_start();
        }
        self.enqueue(
            Pending {
                kind: Kind::Io(io),
                bg,
                flush_stage: false,
            },
            false,
        );
        self.wake_writer();
        Ok(())
    }

    /// Calls `f` when a request completes.
    pub fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        if self.load() < MAX_REQUESTS || self.failing.get() {
            reactor::spawn_local(async move { f() }).detach();
        } else {
            self.space.borrow_mut().push(f);
        }
    }

    /// `base:allocation` at `offset` (one extent, at most `len` bytes).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<RangeStatus, IoStatus> {
        if self.failing.get() || self.closed.get() {
            return Err(IoStatus::Eio);
        }
        let align = self.info.get().min_block.max(1) as u64;
        let max = (u32::MAX as u64) & !(align - 1);
        let (tx, rx) = oneshot::channel();
        // Not counted as a client's request by the gate: a job walking the
        // image asks these between its background reads, and counting them
        // held its reads back as if a client were busy (a stream with no
        // client went a third slower). They still go ahead of background
        // requests in the queue.
        self.queue.borrow_mut().push_back(Pending {
            kind: Kind::Status {
                offset,
                len: len.min(max) as u32,
                tx,
            },
            bg: false,
            flush_stage: false,
        });
        self.wake_writer();
        rx.await.unwrap_or(Err(IoStatus::Aborted))
    }

    fn notify_space(&self) {
        if self.space.borrow().is_empty() || self.load() >= MAX_REQUESTS {
            return;
        }
        let waiters = std::mem::take(&mut *self.space.borrow_mut());
        for f in waiters {
            f();
        }
    }

    /// Completes (or fails) every queued and in-flight request with `st`.
    fn fail_all(&self, st: IoStatus) {
        let mut all: Vec<Pending> = self.queue.borrow_mut().drain(..).collect();
        all.extend(self.bg_queue.borrow_mut().drain(..));
        let sent: Vec<Pending> = self
            .inflight
            .borrow_mut()
            .drain()
            .map(|(_, e)| e.p)
            .collect();
        for p in &sent {
            if p.bg {
                self.bg_ended();
            }
        }
        all.extend(sent);
        for p in all {
            if !p.bg && matches!(p.kind, Kind::Io(_)) {
                self.gate.fg_end();
            }
            match p.kind {
                Kind::Io(io) => io.complete(st),
                Kind::Status { tx, .. } => {
                    let _ = tx.send(Err(st));
                }
            }
        }
        let waiters = std::mem::take(&mut *self.space.borrow_mut());
        for f in waiters {
            f();
        }
    }

    /// Puts the requests in flight back at the front of the queue, in order.
    fn requeue_inflight(&self) {
        let mut v: Vec<(u64, Inflight)> = self.inflight.borrow_mut().drain().collect();
        for (_, e) in &v {
            if e.p.bg {
                self.bg_ended();
            }
        }
        v.sort_by_key(|(k, _)| *k);
        for (_, e) in v.into_iter().rev() {
            self.enqueue(e.p, true);
        }
    }

    /// Encodes `p` (header and payload) into `out`; returns the command, offset and length.
    fn encode(&self, p: &Pending, cookie: u64, out: &mut Vec<u8>) -> (u16, u64, u32) {
        let info = self.info.get();
        let fua = |io: &BdevIo| {
            if io.fua && info.has(tflags::SEND_FUA) {
                cflags::FUA
            } else {
                0
            }
        };
        let (flags, command, offset, len) = match &p.kind {
            Kind::Status { offset, len, .. } => (cflags::REQ_ONE, cmd::BLOCK_STATUS, *offset, *len),
            Kind::Io(_) if p.flush_stage => (0, cmd::FLUSH, 0, 0),
            Kind::Io(io) => match io.io_type {
                IoType::Read => (0, cmd::READ, io.offset, io.len as u32),
                IoType::Write => (fua(io), cmd::WRITE, io.offset, io.len as u32),
                IoType::Flush => (0, cmd::FLUSH, 0, 0),
                IoType::Unmap => (fua(io), cmd::TRIM, io.offset, io.len as u32),
                IoType::WriteZeroes => (
                    fua(io) | cflags::NO_HOLE,
                    cmd::WRITE_ZEROES,
                    io.offset,
                    io.len as u32,
                ),
            },
        };
        out.extend_from_slice(&proto::encode_request(&proto::Request {
            flags,
            cmd: command,
            cookie,
            offset,
            len,
        }));
        if command == cmd::WRITE {
            if let Kind::Io(io) = &p.kind {
                let mut left = len as usize;
                for seg in io.segments() {
                    if left == 0 {
                        break;
                    }
                    let take = seg.len().min(left);
                    out.extend_from_slice(&seg[..take]);
                    left -= take;
                }
            }
        }
        (command, offset, len)
    }

    /// A request's final reply: complete it, or go on to its flush stage.
    fn finish(&self, e: Inflight) {
        if e.p.bg {
            self.bg_ended();
        }
        let st = e.error.unwrap_or(IoStatus::Success);
        match e.p.kind {
            Kind::Io(io) => {
                let info = self.info.get();
                if st.is_ok()
                    && !e.p.flush_stage
                    && io.fua
                    && !info.has(tflags::SEND_FUA)
                    && info.has(tflags::SEND_FLUSH)
                    && matches!(
                        io.io_type,
                        IoType::Write | IoType::Unmap | IoType::WriteZeroes
                    )
                {
                    self.enqueue(
                        Pending {
                            kind: Kind::Io(io),
                            bg: e.p.bg,
                            flush_stage: true,
                        },
                        true,
                    );
                    self.wake_writer();
                    return;
                }
                if !e.p.bg {
                    self.gate.fg_end();
                }
                io.complete(st);
            }
            Kind::Status { tx, .. } => {
                let r = match (st, e.status) {
                    (IoStatus::Success, Some(s)) => Ok(s),
                    (IoStatus::Success, None) => Err(IoStatus::Eio),
                    (st, _) => Err(st),
                };
                let _ = tx.send(r);
            }
        }
        self.notify_space();
    }

    async fn writer(&self, s: &mut AsyncSock) -> io::Result<()> {
        let mut buf = Vec::new();
        loop {
            let first = poll_fn(|cx| {
                if self.closed.get() {
                    return Poll::Ready(None);
                }
                if let Some(p) = self.next_to_send() {
                    return Poll::Ready(Some(p));
                }
                *self.writer_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            let Some(mut p) = first else {
                let disc = proto::encode_request(&proto::Request {
                    flags: 0,
                    cmd: cmd::DISC,
                    cookie: 0,
                    offset: 0,
                    len: 0,
                });
                let _ = s.write_all(&disc).await;
                s.sock.shutdown();
                return Ok(());
            };
            buf.clear();
            loop {
                let cookie = self.next_cookie.get();
                self.next_cookie.set(cookie.wrapping_add(1).max(1));
                let (command, offset, len) = self.encode(&p, cookie, &mut buf);
                self.inflight.borrow_mut().insert(
                    cookie,
                    Inflight {
                        p,
                        cmd: command,
                        offset,
                        len,
                        error: None,
                        status: None,
                    },
                );
                if buf.len() >= 1 << 20 {
                    break;
                }
                match self.next_to_send() {
                    Some(n) => p = n,
                    None => break,
                }
            }
            s.write_all(&buf).await?;
        }
    }

    async fn reader(&self, r: &mut Input) -> io::Result<()> {
        let mut scratch: Vec<u8> = Vec::new();
        loop {
            let mut m = [0u8; 4];
            r.read_exact(&mut m).await?;
            match be32(&m) {
                proto::SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    r.read_exact(&mut h).await?;
                    let err = be32(&h[0..4]);
                    let cookie = be64(&h[4..12]);
                    let (command, len) = match self.inflight.borrow().get(&cookie) {
                        Some(e) => (e.cmd, e.len),
                        None => return Err(garbage(format!("reply to unknown cookie {cookie}"))),
                    };
                    if command == cmd::BLOCK_STATUS && err == 0 {
                        return Err(garbage("simple reply to NBD_CMD_BLOCK_STATUS"));
                    }
                    if command == cmd::READ && err == 0 {
                        if self.info.get().structured {
                            return Err(garbage("simple reply with data to a structured read"));
                        }
                        scratch.resize(len as usize, 0);
                        r.read_exact(&mut scratch).await?;
                        self.counters
                            .bytes_read
                            .fetch_add(len as u64, Ordering::Relaxed);
                    }
                    let Some(mut e) = self.inflight.borrow_mut().remove(&cookie) else {
                        return Err(garbage("reply vanished"));
                    };
                    if err != 0 {
                        e.error = Some(wire_status(err));
                    } else if let Kind::Io(io) = &mut e.p.kind {
                        if command == cmd::READ {
                            io.copy_in(0, &scratch[..len as usize]);
                        }
                    }
                    self.finish(e);
                }
                proto::STRUCTURED_REPLY_MAGIC => {
                    if !self.info.get().structured {
                        return Err(garbage("structured reply without negotiating it"));
                    }
                    let mut h = [0u8; 16];
                    r.read_exact(&mut h).await?;
                    let flags = be16(&h[0..2]);
                    let ty = be16(&h[2..4]);
                    let cookie = be64(&h[4..12]);
                    let plen = be32(&h[12..16]);
                    let (command, offset, len) = match self.inflight.borrow().get(&cookie) {
                        Some(e) => (e.cmd, e.offset, e.len),
                        None => return Err(garbage(format!("reply to unknown cookie {cookie}"))),
                    };
                    let bound = if ty == chunk::OFFSET_DATA {
                        len.saturating_add(8)
                    } else {
                        MAX_META_PAYLOAD
                    };
                    if plen > bound {
                        return Err(garbage(format!(
                            "chunk of {plen} bytes for a {len}-byte request"
                        )));
                    }
                    scratch.resize(plen as usize, 0);
                    r.read_exact(&mut scratch).await?;
                    let p = &scratch[..];
                    let end = offset + len as u64;
                    let in_range =
                        |o: u64, n: u64| o >= offset && o.checked_add(n).is_some_and(|e| e <= end);
                    let mut inf = self.inflight.borrow_mut();
                    let Some(e) = inf.get_mut(&cookie) else {
                        return Err(garbage("reply vanished"));
                    };
                    match ty {
                        chunk::NONE => {
                            if plen != 0 || flags & chunk::FLAG_DONE == 0 {
                                return Err(garbage(
                                    "NBD_REPLY_TYPE_NONE with payload or not final",
                                ));
                            }
                        }
                        chunk::OFFSET_DATA => {
                            if command != cmd::READ || plen < 8 {
                                return Err(garbage("unexpected NBD_REPLY_TYPE_OFFSET_DATA"));
                            }
                            let o = be64(&p[0..8]);
                            let data = &p[8..];
                            if !in_range(o, data.len() as u64) {
                                return Err(garbage("data chunk outside the request"));
                            }
                            self.counters
                                .bytes_read
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                            if let Kind::Io(io) = &mut e.p.kind {
                                io.copy_in((o - offset) as usize, data);
                            }
                        }
                        OFFSET_HOLE => {
                            if command != cmd::READ || plen != 12 {
                                return Err(garbage("unexpected NBD_REPLY_TYPE_OFFSET_HOLE"));
                            }
                            let o = be64(&p[0..8]);
                            let n = be32(&p[8..12]) as u64;
                            if n == 0 || !in_range(o, n) {
                                return Err(garbage("hole chunk outside the request"));
                            }
                            if let Kind::Io(io) = &mut e.p.kind {
                                io.zero((o - offset) as usize, n as usize);
                            }
                        }
                        chunk::BLOCK_STATUS => {
                            if command != cmd::BLOCK_STATUS
                                || plen < 12
                                || !(plen - 4).is_multiple_of(8)
                            {
                                return Err(garbage("unexpected NBD_REPLY_TYPE_BLOCK_STATUS"));
                            }
                            if Some(be32(&p[0..4])) != self.info.get().meta_id || e.status.is_some()
                            {
                                return Err(garbage("block status of an unknown context"));
                            }
                            let n = be32(&p[4..8]) as u64;
                            let f = be32(&p[8..12]);
                            if n == 0 {
                                return Err(garbage("empty extent"));
                            }
                            e.status = Some(RangeStatus {
                                len: n.min(len as u64),
                                allocated: f & state::HOLE == 0,
                                zero: f & state::ZERO != 0,
                            });
                        }
                        t if t & (1 << 15) != 0 => {
                            if plen < 6 || be16(&p[4..6]) as u32 > plen - 6 {
                                return Err(garbage("malformed error chunk"));
                            }
                            let code = be32(&p[0..4]);
                            if code == 0 {
                                return Err(garbage("error chunk with error 0"));
                            }
                            let msg = String::from_utf8_lossy(&p[6..6 + be16(&p[4..6]) as usize]);
                            tracing::warn!(bdev = %self.name, code, %msg, ty = t, "NBD server reported an error");
                            e.error = Some(wire_status(code));
                        }
                        t => return Err(garbage(format!("unknown chunk type {t}"))),
                    }
                    if flags & chunk::FLAG_DONE != 0 {
                        let e = inf.remove(&cookie);
                        drop(inf);
                        if let Some(e) = e {
                            self.finish(e);
                        }
                    }
                }
                other => return Err(garbage(format!("bad reply magic {other:#x}"))),
            }
        }
    }

    /// Runs one connected session until the connection breaks (`Err`) or the
    /// connection is closed (`Ok`).
    async fn session(&self, s: AsyncSock) -> io::Result<()> {
        let dup = s.sock.try_clone()?;
        let mut w = s;
        let mut input = Input {
            s: AsyncSock::new(dup)?,
            buf: vec![0u8; INPUT_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        let rd = Box::pin(self.reader(&mut input));
        let wr = Box::pin(self.writer(&mut w));
        let res = match futures::future::select(rd, wr).await {
            futures::future::Either::Left((r, _)) => r,
            futures::future::Either::Right((r, _)) => r,
        };
        res
    }

    async fn reconnect(&self) -> Result<AsyncSock, String> {
        let (s, info) = connect_and_negotiate(&self.cfg)
            .await
            .map_err(|e| e.to_string())?;
        let old = self.info.get();
        if info.size != old.size {
            return Err(format!(
                "the export's size changed from {} to {} bytes",
                old.size, info.size
            ));
        }
        if info.has(tflags::READ_ONLY) && !old.has(tflags::READ_ONLY) {
            return Err("the export became read-only".into());
        }
        if info.min_block > old.min_block || info.max_payload < old.max_payload {
            return Err("the export's block sizes changed".into());
        }
        if info.structured != old.structured || info.meta_id.is_some() != old.meta_id.is_some() {
            return Err("the server's capabilities changed".into());
        }
        self.info.set(ExportInfo {
            meta_id: info.meta_id,
            flags: info.flags,
            ..old
        });
        Ok(s)
    }

    async fn nap(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.closed.get() && Instant::now() < end {
            reactor::sleep(Duration::from_millis(20).min(end - Instant::now())).await;
        }
    }
}

async fn supervise(c: Rc<Conn>, first: Option<Sock>) {
    let mut sock = first.and_then(|s| match AsyncSock::new(s) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(bdev = %c.name, error = %e, "cannot register the NBD socket");
            None
        }
    });
    let mut broken_since = sock.is_none().then(Instant::now);
    let mut backoff = Duration::from_millis(50);
    let mut logged = false;
    while !c.closed.get() {
        let s = match sock.take() {
            Some(s) => s,
            None => match c.reconnect().await {
                Ok(s) => {
                    c.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(bdev = %c.name, server = %c.cfg.filename(), "NBD connection re-established");
                    s
                }
                Err(e) => {
                    if !logged {
                        tracing::warn!(bdev = %c.name, server = %c.cfg.filename(), error = %e, "NBD reconnection failed; retrying");
                        logged = true;
                    }
                    let since = broken_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= c.cfg.reconnect_delay && !c.failing.get() {
                        c.failing.set(true);
                        c.fail_all(IoStatus::Eio);
                    }
                    c.nap(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        c.failing.set(false);
        backoff = Duration::from_millis(50);
        logged = false;
        c.up.set(true);
        let r = c.session(s).await;
        c.up.set(false);
        match r {
            Ok(()) => break,
            Err(e) => {
                c.counters.drops.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(bdev = %c.name, server = %c.cfg.filename(), error = %e, "NBD connection lost; reconnecting");
                c.requeue_inflight();
                broken_since = Some(Instant::now());
                if c.cfg.reconnect_delay.is_zero() {
                    c.failing.set(true);
                    c.fail_all(IoStatus::Eio);
                }
            }
        }
    }
    c.fail_all(IoStatus::Aborted);
}

/// Replies read ahead from the socket.
struct Input {
    s: AsyncSock,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Input {
    async fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(out.len() - got);
                out[got..got + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                got += n;
                continue;
            }
            if out.len() - got >= self.buf.len() {
                return self.s.read_exact(&mut out[got..]).await.map_err(eof);
            }
            poll_fn(|cx| self.s.reg.poll_readable(cx)).await;
            match self.s.sock.read(&mut self.buf) {
                Ok(0) => return Err(eof(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    self.start = 0;
                    self.end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.s.reg.clear_readable(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn eof(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        )
    } else {
        e
    }
}

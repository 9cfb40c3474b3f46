//! [`NbdBdev`]: a block device whose data lives on an NBD server, under the
//! bdev contract (`bdev/src/bdev.rs`, `io.rs`).
//!
//! - Connections: when the server sets `NBD_FLAG_CAN_MULTI_CONN` (flush and
//!   FUA then cover every connection), each reactor that uses the bdev has its
//!   own connection ([`Conn`]), made with its channel (the first reuses the
//!   socket negotiated at open): requests never cross threads. Otherwise, as
//!   QEMU does, there is one connection, on the reactor that opened the bdev
//!   (its owner); a channel on another reactor forwards each request there
//!   (the data copied into a message and back) and completes it on its own
//!   reactor. A server limited to one client (qemu-nbd's default) works.
//! - Background requests ([`BdevIo::background`]: a job's bulk copy through
//!   a qcow2 overlay's NBD backing) must not delay clients' requests. With
//!   multi-conn, each reactor's channel opens a second connection at the
//!   first background request and sends background requests on it once it
//!   is up (on the first connection until then), so a client's read never
//!   waits behind job data in the socket. Each connection's queue sends
//!   foreground requests first (`conn.rs`), and a reactor's connections of
//!   the bdev share one gate (`gate.rs`): while a client is busy, background
//!   requests go one at a time over all of them, and a background read
//!   submitted then goes in pieces of at most 64 KiB (`split.rs`).
//! - Reads and writes larger than the server's maximum payload (at most
//!   32 MiB), and trims or write-zeroes of 4 GiB or more, are refused with
//!   EINVAL; the block size is the server's minimum block size, at least 512
//!   (an export whose size is not a multiple of it loses its tail).
//! - FUA goes down as `NBD_CMD_FLAG_FUA` (emulated with a flush after the
//!   write when the server lacks it); write-zeroes carries `NBD_CMD_FLAG_NO_HOLE`
//!   (QEMU's mapping of a write-zeroes without `BDRV_REQ_MAY_UNMAP`; sluice's
//!   requests carry no "may unmap" or "no fallback" flag, so `FAST_ZERO` is
//!   never asked for); a server without flush support completes flushes at
//!   once (it has no cache to flush); trim and write-zeroes are offered only
//!   when the server offers them.
//! - [`Bdev::range_status`] asks `NBD_CMD_BLOCK_STATUS` of `base:allocation`
//!   (one extent per query) when the server negotiated it; otherwise every
//!   range is reported as data.
//! - A server that says read-only makes the bdev read-only.

use super::config::ClientConfig;
use super::conn::{connect_and_negotiate, Conn, Counters};
use super::gate::Gate;
use super::handshake::{ExportInfo, HandshakeError};
use super::split;
use crate::net::Sock;
use crate::proto::tflags;
use bdev::{Bdev, BdevError, BdevIo, Channel, DmaBuf, IoStatus, IoType, RangeStatusFuture};
use serde_json::{json, Value};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak as RcWeak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This reactor's connection of each NBD bdev (by id).
    static CONNS: RefCell<HashMap<u64, RcWeak<Conn>>> = RefCell::new(HashMap::new());
}

/// A block device on an NBD server.
pub struct NbdBdev {
    me: Weak<NbdBdev>,
    id: u64,
    name: String,
    cfg: Arc<ClientConfig>,
    info: ExportInfo,
    block_size: u32,
    read_only: bool,
    first: Mutex<Option<Sock>>,
    counters: Arc<Counters>,
    /// The reactor that opened the bdev: the one connection's, without multi-conn.
    owner: usize,
}

fn open_error(cfg: &ClientConfig, e: HandshakeError) -> BdevError {
    let target = match &cfg.server {
        super::ServerAddr::Unix(p) => p.display().to_string(),
        super::ServerAddr::Inet { host, port } => format!("{host}:{port}"),
    };
    match e {
        HandshakeError::Io(err) => BdevError::os(format!("Failed to connect to '{target}'"), err),
        HandshakeError::Protocol(m) => BdevError::os(
            format!("NBD server at '{target}'"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("NBD protocol error: {m}"),
            ),
        ),
        HandshakeError::Refused(m) => BdevError::PermissionConflict(m),
    }
}

impl NbdBdev {
    /// Connects to the server and negotiates the export (retried for
    /// `open-timeout` while nothing answers). Call on a reactor. The bdev is
    /// read-only when `read_only` asks for it or the server says so.
    pub async fn open(
        name: &str,
        cfg: ClientConfig,
        read_only: bool,
    ) -> Result<Arc<NbdBdev>, BdevError> {
        let deadline = Instant::now() + cfg.open_timeout;
        let (s, info) = loop {
            match connect_and_negotiate(&cfg).await {
                Ok(v) => break v,
                Err(e) => {
                    let retry = matches!(e, HandshakeError::Io(_)) && Instant::now() < deadline;
                    if !retry {
                        return Err(open_error(&cfg, e));
                    }
                    reactor::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let block_size = info.min_block.max(512);
        if info.size < block_size as u64 {
            return Err(BdevError::InvalidParam(format!(
                "NBD export of {} bytes is smaller than one block",
                info.size
            )));
        }
        let owner = reactor::current_index()
            .ok_or_else(|| BdevError::Runtime("NBD clients are opened on a reactor".into()))?;
        // The registration is this reactor's; the socket moves to the first channel.
        let crate::net::AsyncSock { reg, sock } = s;
        drop(reg);
        tracing::info!(bdev = name, server = %cfg.filename(), size = info.size, flags = info.flags,
            structured = info.structured, block_status = info.meta_id.is_some(), "NBD export opened");
        Ok(Arc::new_cyclic(|me| NbdBdev {
            me: me.clone(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            cfg: Arc::new(cfg),
            info,
            block_size,
            read_only: read_only || info.has(tflags::READ_ONLY),
            first: Mutex::new(Some(sock)),
            counters: Arc::new(Counters::default()),
            owner,
        }))
    }

    /// The client's settings.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The export as negotiated at open.
    pub fn export_info(&self) -> ExportInfo {
        self.info
    }

    /// Data bytes received in read replies so far.
    pub fn bytes_read(&self) -> u64 {
        self.counters.bytes_read.load(Ordering::Relaxed)
    }

    fn multi_conn(&self) -> bool {
        self.info.has(tflags::CAN_MULTI_CONN)
    }

    /// Runs a request forwarded from another reactor on this (the owner's)
    /// connection; returns its status and, for a read, its data.
    async fn forwarded(self: Arc<Self>, f: Forward) -> (IoStatus, Option<Vec<u8>>) {
        let me: Arc<dyn Bdev> = self;
        let ch = match bdev::channel(&me) {
            Ok(c) => c,
            Err(_) => return (IoStatus::Eio, None),
        };
        let buf = match f.data {
            Some(d) => DmaBuf::from_slice(&d).ok(),
            None if f.io_type == IoType::Read => DmaBuf::new(f.len as usize).ok(),
            None => None,
        };
        if f.io_type.has_data() && buf.is_none() {
            return (IoStatus::Nomem, None);
        }
        let mut io = BdevIo::new(f.io_type, f.offset, f.len, buf, None);
        io.fua = f.fua;
        io.background = f.background;
        let mut io = bdev::submit_wait(&ch, io).await;
        let st = io.status;
        let data = (f.io_type == IoType::Read && st.is_ok())
            .then(|| io.take_buf().map(|b| b.as_slice().to_vec()))
            .flatten();
        (st, data)
    }

    /// Whether this reactor's gate for the bdev counts a client as busy
    /// (tests).
    #[cfg(test)]
    pub(crate) fn client_busy_here(&self) -> Option<bool> {
        self.local_conn().map(|c| c.gate().busy())
    }

    fn local_conn(&self) -> Option<Rc<Conn>> {
        CONNS.with(|m| m.borrow().get(&self.id).and_then(|w| w.upgrade()))
    }
}

impl Bdev for NbdBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "NBD disk"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.info.size / self.block_size as u64
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap => self.info.has(tflags::SEND_TRIM),
            IoType::WriteZeroes => self.info.has(tflags::SEND_WRITE_ZEROES),
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let here = reactor::current_index();
        if !self.multi_conn() && here != Some(self.owner) {
            return Ok(Box::new(NbdChannel {
                target: Target::Remote(self.owner),
                bg: RefCell::new(None),
                bdev: self.me.clone(),
            }));
        }
        let conn = match self.local_conn() {
            Some(c) => c,
            None => {
                let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
                let conn = Conn::start(
                    self.name.clone(),
                    self.cfg.clone(),
                    self.info,
                    self.counters.clone(),
                    first,
                    Gate::new(),
                );
                CONNS.with(|m| m.borrow_mut().insert(self.id, Rc::downgrade(&conn)));
                conn
            }
        };
        Ok(Box::new(NbdChannel {
            target: Target::Local(conn),
            bg: RefCell::new(None),
            bdev: self.me.clone(),
        }))
    }
    fn filename(&self) -> Option<String> {
        Some(self.cfg.filename())
    }
    fn driver_specific(&self) -> Value {
        json!({"nbd": {
            "filename": self.cfg.filename(),
            "export": self.cfg.export_name(),
            "reconnect_delay": self.cfg.reconnect_delay.as_secs(),
            "structured_replies": self.info.structured,
            "block_status": self.info.meta_id.is_some(),
            "multi_conn": self.info.has(tflags::CAN_MULTI_CONN),
            "bytes_read": self.bytes_read(),
            "reconnects": self.counters.reconnects.load(Ordering::Relaxed),
            "connections_dropped": self.counters.drops.load(Ordering::Relaxed),
        }})
    }
    fn config(&self) -> Option<Value> {
        let mut p = json!({"name": self.name, "export": self.cfg.export_name(),
            "reconnect_delay": self.cfg.reconnect_delay.as_secs()});
        match &self.cfg.server {
            super::ServerAddr::Unix(s) => p["socket"] = json!(s.display().to_string()),
            super::ServerAddr::Inet { host, port } => {
                p["host"] = json!(host);
                p["port"] = json!(port);
            }
        }
        Some(json!({"method": "bdev_nbd_client_create", "params": p}))
    }
    fn on_delete(&self) {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        self.info.meta_id?;
        // The server answers only inside the export: past its end (a backing
        // file shorter than its overlay) reads as zeroes.
        let size = self.size();
        if offset >= size {
            let st = bdev::RangeStatus {
                len: len.max(1),
                allocated: false,
                zero: true,
            };
            return Some(Box::pin(async move { Ok(st) }));
        }
        let len = len.min(size - offset);
        let me: Arc<dyn Bdev> = self.me.upgrade()?;
        let id = self.id;
        let owner = self.owner;
        if !self.multi_conn() && reactor::current_index() != Some(owner) {
            return Some(Box::pin(async move {
                let rt =
                    reactor::handle().ok_or_else(|| BdevError::Runtime("no runtime".into()))?;
                rt.spawn_on(owner, move || async move {
                    match me.range_status(offset, len) {
                        Some(f) => f.await,
                        None => Err(BdevError::Runtime("NBD block status unavailable".into())),
                    }
                })
                .await
                .map_err(|e| BdevError::Runtime(e.to_string()))?
            }));
        }
        Some(Box::pin(async move {
            let _ch = bdev::channel(&me)?;
            let conn = CONNS
                .with(|m| m.borrow().get(&id).and_then(|w| w.upgrade()))
                .ok_or_else(|| BdevError::Runtime("NBD connection closed".into()))?;
            conn.block_status(offset, len).await.map_err(BdevError::Io)
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A request on its way to the owner reactor.
struct Forward {
    io_type: IoType,
    offset: u64,
    len: u64,
    fua: bool,
    background: bool,
    data: Option<Vec<u8>>,
}

enum Target {
    /// This reactor's connection.
    Local(Rc<Conn>),
    /// The owner reactor's connection, through messages.
    Remote(usize),
}

/// One reactor's channel.
struct NbdChannel {
    target: Target,
    /// With multi-conn: this reactor's connection for background requests
    /// (made at the first one).
    bg: RefCell<Option<Rc<Conn>>>,
    bdev: Weak<NbdBdev>,
}

impl NbdChannel {
    /// The connection for background request `io` on `fg`'s reactor: the
    /// second connection when the server allows several and it is up.
    fn background_conn(&self, b: &NbdBdev, fg: &Rc<Conn>) -> Rc<Conn> {
        if !b.multi_conn() {
            return fg.clone();
        }
        let mut bg = self.bg.borrow_mut();
        let c = bg.get_or_insert_with(|| {
            Conn::start(
                format!("{} (background)", b.name),
                b.cfg.clone(),
                b.info,
                b.counters.clone(),
                None,
                fg.gate(),
            )
        });
        if c.is_up() {
            c.clone()
        } else {
            fg.clone()
        }
    }
}

impl Channel for NbdChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let Some(b) = self.bdev.upgrade() else {
            bdev::complete_deferred(io, IoStatus::Aborted);
            return Ok(());
        };
        let info = b.info;
        match io.io_type {
            IoType::Read | IoType::Write if io.len > info.max_payload as u64 => {
                bdev::complete_deferred(io, IoStatus::Einval);
                return Ok(());
            }
            IoType::Unmap | IoType::WriteZeroes if io.len > u32::MAX as u64 => {
                bdev::complete_deferred(io, IoStatus::Einval);
                return Ok(());
            }
            IoType::Flush if !info.has(tflags::SEND_FLUSH) => {
                bdev::complete_deferred(io, IoStatus::Success);
                return Ok(());
            }
            _ => {}
        }
        match &self.target {
            Target::Local(c) if io.background && split::wanted(&io, &c.gate()) => {
                split::read_in_pieces(b, c.gate(), io);
                Ok(())
            }
            Target::Local(c) if io.background => self.background_conn(&b, c).submit(io),
            Target::Local(c) => c.submit(io),
            Target::Remote(owner) => {
                forward(b, *owner, io);
                Ok(())
            }
        }
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        let bg = self.bg.borrow().clone();
        match &self.target {
            Target::Local(_) if bg.as_ref().is_some_and(|c| c.is_full()) => {
                if let Some(c) = bg {
                    c.wait_for_space(f)
                }
            }
            Target::Local(c) => c.wait_for_space(f),
            Target::Remote(_) => reactor::spawn_local(async move { f() }).detach(),
        }
    }
}

/// Sends `io` to the owner reactor's connection and completes it here.
fn forward(b: Arc<NbdBdev>, owner: usize, mut io: Box<BdevIo>) {
    let data = (io.io_type == IoType::Write).then(|| {
        let mut v = vec![0u8; io.len as usize];
        io.copy_out(0, &mut v);
        v
    });
    let f = Forward {
        io_type: io.io_type,
        offset: io.offset,
        len: io.len,
        fua: io.fua,
        background: io.background,
        data,
    };
    let Some(rt) = reactor::handle() else {
        bdev::complete_deferred(io, IoStatus::Aborted);
        return;
    };
    reactor::spawn_local(async move {
        let h = rt.spawn_on(owner, move || b.forwarded(f));
        match h.await {
            Ok((st, data)) => {
                if let Some(d) = data {
                    io.copy_in(0, &d);
                }
                io.complete(st);
            }
            Err(_) => io.complete(IoStatus::Aborted),
        }
    })
    .detach();
}

impl Drop for NbdChannel {
    fn drop(&mut self) {
        if let Target::Local(c) = &self.target {
            c.close();
        }
        if let Some(c) = self.bg.borrow_mut().take() {
            c.close();
        }
    }
}

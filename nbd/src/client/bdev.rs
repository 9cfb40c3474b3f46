//! [`NbdBdev`]: a block device whose data lives on an NBD server, under the
//! bdev contract (`bdev/src/bdev.rs`, `io.rs`).
//!
//! - Each reactor that uses the bdev has its own connection ([`Conn`]), made
//!   when its channel is made (the first reuses the socket negotiated at
//!   open): requests never cross threads, and a bdev used from several
//!   reactors talks to the server over several connections, which the
//!   protocol makes consistent when the server sets `NBD_FLAG_CAN_MULTI_CONN`.
//!   Without that flag a flush is sent on every connection of the bdev (the
//!   flush completes when all of them have), so it covers writes completed
//!   through any reactor.
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
use super::handshake::{ExportInfo, HandshakeError};
use crate::net::Sock;
use crate::proto::tflags;
use bdev::{Bdev, BdevError, BdevIo, Channel, IoDone, IoStatus, IoType, RangeStatusFuture};
use futures::channel::oneshot;
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
    first: Mutex<Option<Sock>>,
    counters: Arc<Counters>,
    /// Reactors with a connection (for a flush on every connection).
    reactors: Mutex<Vec<usize>>,
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
        HandshakeError::Refused(m) => match m.split_once(": ") {
            Some((a, b)) => BdevError::os(a.to_string(), std::io::Error::other(b.to_string())),
            None => BdevError::os(m, std::io::Error::other("refused by the server")),
        },
    }
}

impl NbdBdev {
    /// Connects to the server and negotiates the export (retried for
    /// `open-timeout` while nothing answers). Call on a reactor.
    pub async fn open(name: &str, cfg: ClientConfig) -> Result<Arc<NbdBdev>, BdevError> {
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
            first: Mutex::new(Some(sock)),
            counters: Arc::new(Counters::default()),
            reactors: Mutex::new(Vec::new()),
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
        self.info.has(tflags::READ_ONLY)
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        if let Some(c) = self.local_conn() {
            return Ok(Box::new(NbdChannel {
                conn: c,
                bdev: self.me.clone(),
            }));
        }
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let conn = Conn::start(
            self.name.clone(),
            self.cfg.clone(),
            self.info,
            self.counters.clone(),
            first,
        );
        CONNS.with(|m| m.borrow_mut().insert(self.id, Rc::downgrade(&conn)));
        if let Some(r) = reactor::current_index() {
            let mut v = self.reactors.lock().unwrap_or_else(|e| e.into_inner());
            if !v.contains(&r) {
                v.push(r);
            }
        }
        Ok(Box::new(NbdChannel {
            conn,
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
        let me: Arc<dyn Bdev> = self.me.upgrade()?;
        let id = self.id;
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

/// One reactor's channel: its connection.
struct NbdChannel {
    conn: Rc<Conn>,
    bdev: Weak<NbdBdev>,
}

impl Channel for NbdChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let info = self.conn.info();
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
            IoType::Flush if !info.has(tflags::CAN_MULTI_CONN) => {
                return self.flush_everywhere(io);
            }
            _ => {}
        }
        self.conn.submit(io)
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.conn.wait_for_space(f)
    }
}

impl NbdChannel {
    /// A flush on a server without multi-conn: this connection's, then every
    /// other reactor's connection's, then completion here.
    fn flush_everywhere(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let others: Vec<usize> = match self.bdev.upgrade() {
            Some(b) => {
                let here = reactor::current_index();
                b.reactors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .filter(|r| Some(*r) != here)
                    .collect()
            }
            None => Vec::new(),
        };
        if others.is_empty() {
            return self.conn.submit(io);
        }
        let bdev = self.bdev.clone();
        let conn = self.conn.clone();
        reactor::spawn_local(async move {
            let mut st = flush_local(&conn).await;
            if let (Some(rt), Some(b)) = (reactor::handle(), bdev.upgrade()) {
                for r in others {
                    let b = b.clone();
                    let h = rt.spawn_on(r, move || async move {
                        let conn = b.local_conn();
                        match conn {
                            Some(c) => flush_local(&c).await,
                            None => IoStatus::Success,
                        }
                    });
                    match h.await {
                        Ok(s) if !s.is_ok() => st = s,
                        Ok(_) => {}
                        Err(_) => st = IoStatus::Eio,
                    }
                }
            }
            io.complete(st);
        })
        .detach();
        Ok(())
    }
}

/// Hands a request's status to a waiting task.
struct StatusDone(RefCell<Option<oneshot::Sender<IoStatus>>>);

impl IoDone for StatusDone {
    fn io_done(&self, io: Box<BdevIo>) {
        if let Some(tx) = self.0.borrow_mut().take() {
            let _ = tx.send(io.status);
        }
    }
}

/// A flush on this reactor's connection `c`, awaited.
async fn flush_local(c: &Rc<Conn>) -> IoStatus {
    let (tx, rx) = oneshot::channel();
    let done: Rc<dyn IoDone> = Rc::new(StatusDone(RefCell::new(Some(tx))));
    let mut io = BdevIo::new(IoType::Flush, 0, 0, None, Some(done));
    loop {
        match c.submit(io) {
            Ok(()) => break,
            Err(back) => {
                io = back;
                reactor::sleep(Duration::from_micros(50)).await;
            }
        }
    }
    rx.await.unwrap_or(IoStatus::Aborted)
}

impl Drop for NbdChannel {
    fn drop(&mut self) {
        self.conn.close();
    }
}

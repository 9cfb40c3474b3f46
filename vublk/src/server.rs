//! The vhost-user-blk exports of one service: each listens on its own Unix
//! socket and serves one front end at a time (as qemu-storage-daemon does: a
//! second front end waits in the backlog until the first hangs up).
//!
//! A socket's control messages are read on a thread of the export's own
//! (vhost-user control is rare and may block on a front end; SPDK runs it on a
//! thread of rte_vhost's too); the virtqueues run on the reactors
//! ([`crate::vring`]). An export claims its node as the NBD server does: a plain
//! node through a hidden device over it (which a snapshot of the node moves
//! onto the overlay and a pivot onto the target), a device as it is, so the
//! export follows its device through snapshots, streams and pivots.

use crate::backend::BlkBackend;
use crate::blk;
use crate::coalesce::Coalescing;
use crate::error::VublkError;
use crate::vring::DevShared;
use bdev::device::Device;
use bdev::{Bdev, Holder, Registry};
use graph::events::EventBus;
use reactor::RuntimeHandle;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

/// How long a safe delete waits for a front end that is hanging up.
const SAFE_DEL_GRACE: Duration = Duration::from_secs(2);

/// An export's settings (`block-export-add` type `vhost-user-blk`, or SPDK's
/// `vhost_create_blk_controller`).
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export id (the controller's name for SPDK).
    pub id: String,
    /// The node exported.
    pub node: String,
    /// The Unix socket's path.
    pub path: PathBuf,
    /// Whether the guest may write.
    pub writable: bool,
    /// Number of virtqueues offered (`num-queues`, default 1).
    pub num_queues: u16,
    /// The logical block size the guest sees (default 512).
    pub logical_block_size: u32,
    /// Start with the write cache off (every write durable); the guest may
    /// switch it (`CONFIG_WCE`).
    pub writethrough: bool,
    /// Which dialect made it (`query-block-exports` shows QMP's, `vhost_get_controllers` SPDK's).
    pub spdk: bool,
}

/// One row of `query-block-exports` / `vhost_get_controllers`.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// The settings.
    pub cfg: ExportConfig,
    /// The node the export is attached to now.
    pub node: String,
    /// Whether a front end is connected.
    pub connected: bool,
    /// Requests completed since the export was added.
    pub completed: u64,
    /// Interrupt coalescing: `(delay_base_us, iops_threshold)`.
    pub coalescing: (u32, u32),
}

impl ExportInfo {
    /// QEMU's `BlockExportInfo`.
    pub fn to_qmp(&self) -> Value {
        json!({"type": "vhost-user-blk", "id": self.cfg.id, "node-name": self.node,
               "shutting-down": false})
    }

    /// SPDK's `vhost_get_controllers` entry.
    pub fn to_spdk(&self) -> Value {
        json!({
            "ctrlr": self.cfg.id,
            "cpumask": "",
            "delay_base_us": self.coalescing.0,
            "iops_threshold": self.coalescing.1,
            "socket": self.cfg.path.display().to_string(),
            "sessions": if self.connected { json!([{"vid": 0, "id": 0, "name": format!("{}s0", self.cfg.id), "started": true}]) } else { json!([]) },
            "backend_specific": {"block": {"readonly": !self.cfg.writable, "bdev": self.node, "transport": "vhost_user_blk"}},
            "completed_requests": self.completed,
        })
    }
}

struct Export {
    cfg: ExportConfig,
    bdev: Arc<dyn Bdev>,
    stop: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    completed: Arc<AtomicU64>,
    coalescing: Arc<Coalescing>,
    on_gone: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Export {
    fn node_name(&self) -> String {
        match Device::from_bdev(&self.bdev) {
            Some(d) if d.is_hidden() => d.root().name().to_string(),
            _ => self.cfg.node.clone(),
        }
    }

    fn connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// The service's vhost-user-blk exports.
#[derive(Default)]
pub struct VhostServer {
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    next_reactor: AtomicUsize,
}

impl VhostServer {
    /// Adds an export of `cfg.node` (a bdev or device in `nodes`), claiming it,
    /// and starts listening on `cfg.path`.
    pub fn add(
        &self,
        rt: &RuntimeHandle,
        nodes: &Arc<Registry>,
        events: Option<EventBus>,
        cfg: ExportConfig,
    ) -> Result<(), VublkError> {
        if cfg.id.is_empty() {
            return Err(VublkError::Invalid("id: must not be empty".into()));
        }
        let lbs = cfg.logical_block_size;
        if !(512..=(2 << 20)).contains(&lbs) || !lbs.is_power_of_two() {
            return Err(VublkError::Invalid(
                "parameter logical-block-size must be a power of 2 between 512 and 2097152".into(),
            ));
        }
        if cfg.num_queues == 0 {
            return Err(VublkError::Invalid(
                "num-queues must be greater than 0".into(),
            ));
        }
        let mut m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&cfg.id) {
            return Err(VublkError::IdInUse(cfg.id));
        }
        let node = nodes.get(&cfg.node).map_err(|e| match e {
            bdev::BdevError::NotFound(n) => {
                VublkError::Invalid(format!("Cannot find device='' nor node-name='{n}'"))
            }
            e => e.into(),
        })?;
        if cfg.writable && node.read_only() {
            return Err(VublkError::ReadOnlyNode(cfg.node));
        }
        if u64::from(lbs) < u64::from(node.block_size()) {
            return Err(VublkError::Invalid(format!(
                "logical-block-size {lbs} is smaller than the node's block size {}",
                node.block_size()
            )));
        }
        let listener = listen(&cfg.path)?;
        let claim = format!("vhost-user-blk export {}", cfg.id);
        let holder = Holder::Export(claim.clone());
        let hidden = Device::from_bdev(&node).is_none();
        let bdev = if hidden {
            Device::new_hidden(nodes, &claim, node)?
        } else {
            nodes.claim(&cfg.node, bdev::Claim::root(holder.clone(), cfg.writable))?;
            node
        };
        let (id, name) = (cfg.id.clone(), cfg.node.clone());
        let (exported, rt2, nodes2, path) =
            (bdev.clone(), rt.clone(), nodes.clone(), cfg.path.clone());
        let on_gone: Box<dyn FnOnce() + Send> = Box::new(move || {
            if hidden {
                Device::close_hidden(&exported, &rt2);
            } else {
                nodes2.release(&name, &holder);
            }
            let _ = std::fs::remove_file(&path);
            tracing::info!(id = %id, "vhost-user-blk export deleted");
            if let Some(ev) = events {
                ev.publish("BLOCK_EXPORT_DELETED", json!({"id": id}));
            }
        });
        let e = Arc::new(Export {
            cfg: cfg.clone(),
            bdev,
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            thread: Mutex::new(None),
            completed: Arc::new(AtomicU64::new(0)),
            coalescing: Arc::new(Coalescing::default()),
            on_gone: Mutex::new(Some(on_gone)),
        });
        let first = self.next_reactor.fetch_add(1, Ordering::Relaxed);
        let (e2, rt2) = (e.clone(), rt.clone());
        let t = std::thread::Builder::new()
            .name(format!("vhost-{}", cfg.id))
            .spawn(move || serve(e2, listener, rt2, first))
            .map_err(|err| VublkError::Listen {
                path: cfg.path.display().to_string(),
                err,
            })?;
        *e.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        tracing::info!(id = %cfg.id, node = %cfg.node, path = %cfg.path.display(), writable = cfg.writable, queues = cfg.num_queues, "vhost-user-blk export added");
        m.insert(cfg.id.clone(), e);
        Ok(())
    }

    /// Removes an export: `hard` disconnects its front end (after the
    /// requests in flight); otherwise it fails while one is connected.
    pub fn del(&self, id: &str, hard: bool) -> Result<(), VublkError> {
        let e = {
            let mut m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
            let e = m
                .get(id)
                .cloned()
                .ok_or_else(|| VublkError::NoSuchExport(id.to_string()))?;
            if !hard && e.connected() {
                // A front end that has just hung up is given a moment to be seen gone.
                drop(m);
                let t0 = std::time::Instant::now();
                while e.connected() && t0.elapsed() < SAFE_DEL_GRACE {
                    std::thread::sleep(Duration::from_millis(10));
                }
                m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
                if e.connected() {
                    return Err(VublkError::InUse(id.to_string()));
                }
            }
            if m.remove(id).is_none() {
                return Err(VublkError::NoSuchExport(id.to_string()));
            }
            e
        };
        e.stop.store(true, Ordering::SeqCst);
        if let Some(c) = e.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let t = e.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        if let Some(f) = e.on_gone.lock().unwrap_or_else(|p| p.into_inner()).take() {
            f();
        }
        Ok(())
    }

    /// Whether an export of this id exists.
    pub fn contains(&self, id: &str) -> bool {
        self.exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// Every export.
    pub fn exports(&self) -> Vec<ExportInfo> {
        let m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .map(|e| ExportInfo {
                cfg: e.cfg.clone(),
                node: e.node_name(),
                connected: e.connected(),
                completed: e.completed.load(Ordering::Relaxed),
                coalescing: e.coalescing.get(),
            })
            .collect()
    }

    /// Sets an export's interrupt coalescing (SPDK's
    /// `vhost_controller_set_coalescing`; [`crate::coalesce`]): its queues,
    /// running or not, follow from their next measuring window.
    pub fn set_coalescing(
        &self,
        id: &str,
        delay_base_us: u32,
        iops_threshold: u32,
    ) -> Result<(), VublkError> {
        let m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        let e = m
            .get(id)
            .ok_or_else(|| VublkError::NoSuchExport(id.to_string()))?;
        e.coalescing
            .set(delay_base_us, iops_threshold)
            .map_err(VublkError::Invalid)
    }

    /// Removes every export (service shutdown).
    pub fn shutdown(&self) {
        let ids: Vec<String> = self
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            let _ = self.del(&id, true);
        }
    }
}

/// Binds `path`, replacing a stale socket (never another kind of file).
fn listen(path: &std::path::Path) -> Result<UnixListener, VublkError> {
    let err = |err| VublkError::Listen {
        path: path.display().to_string(),
        err,
    };
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(err(std::io::Error::from(ErrorKind::AlreadyExists)));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::from(ErrorKind::AddrInUse)));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// The export's control thread: accepts one front end at a time and handles
/// its messages until it hangs up (or the export is deleted).
fn serve(e: Arc<Export>, l: UnixListener, rt: RuntimeHandle, first: usize) {
    while !e.stop.load(Ordering::SeqCst) {
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "vhost-user-blk accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Err(err) = connection(&e, s, &rt, first) {
            tracing::warn!(id = %e.cfg.id, error = %err, "vhost-user-blk connection failed");
        }
    }
}

fn connection(
    e: &Arc<Export>,
    s: UnixStream,
    rt: &RuntimeHandle,
    first: usize,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    let mut id = [0u8; blk::ID_BYTES];
    let n = e.cfg.id.len().min(blk::ID_BYTES);
    id[..n].copy_from_slice(&e.cfg.id.as_bytes()[..n]);
    let dev = Arc::new(DevShared {
        bdev: e.bdev.clone(),
        writable: e.cfg.writable,
        writeback: AtomicBool::new(!e.cfg.writethrough),
        id,
        conn: s.try_clone()?,
        completed: AtomicU64::new(0),
        coalescing: e.coalescing.clone(),
    });
    *e.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.try_clone()?);
    if e.stop.load(Ordering::SeqCst) {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    tracing::info!(id = %e.cfg.id, "vhost-user-blk front end connected");
    let why = serve_connection(
        dev.clone(),
        s,
        rt,
        first,
        e.cfg.num_queues,
        e.cfg.logical_block_size,
    );
    e.completed
        .fetch_add(dev.completed.load(Ordering::Relaxed), Ordering::Relaxed);
    *e.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    match why {
        None => tracing::info!(id = %e.cfg.id, "vhost-user-blk front end disconnected"),
        Some(err) => {
            tracing::warn!(id = %e.cfg.id, error = %err, "vhost-user-blk front end dropped")
        }
    }
    Ok(())
}

/// Serves one front end's control messages on `s` until it hangs up or sends
/// what drops it (`None`: it hung up; else why it was dropped): the device is
/// a [`BlkBackend`] over `dev` with `num_queues` rings from reactor `first`
/// on. Every ring is stopped and the socket shut before it returns, so the
/// front end sees the end even while a clone of the socket lives on. The
/// export's control thread runs it for each connection (the fuzz target
/// `vhost_user` drives it over a socket pair).
pub fn serve_connection(
    dev: Arc<DevShared>,
    s: UnixStream,
    rt: &RuntimeHandle,
    first: usize,
    num_queues: u16,
    blk_size: u32,
) -> Option<VuError> {
    let closer = s.try_clone();
    let backend = Arc::new(BlkBackend::new(
        dev,
        rt.clone(),
        first,
        num_queues,
        blk_size,
    ));
    let mut h = BackendReqHandler::from_stream(s, backend.clone());
    let why = loop {
        match h.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) | Err(VuError::PartialMessage) => break None,
            Err(err) => break Some(err),
        }
    };
    backend.stop_all();
    if let Ok(c) = closer {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn msg(code: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for w in [code, 1, body.len() as u32] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m.extend_from_slice(body);
        m
    }

    /// Runs `serve_connection` on a thread over a socket pair, sends `bytes`
    /// (without hanging up) and returns what the front end read up to the
    /// connection's end, and why the device ended it.
    fn serve(bytes: &[u8]) -> (Vec<u8>, Option<String>) {
        let mut cfg = reactor::RuntimeConfig::new(reactor::CoreSet::from_list("0").expect("cores"));
        cfg.pin = false;
        let rt = reactor::Runtime::start(cfg).expect("runtime");
        let bdev: Arc<dyn Bdev> =
            bdev::malloc::MallocBdev::new("m0", 64, 512, None).expect("malloc");
        let (mut front, back) = UnixStream::pair().expect("pair");
        let dev = Arc::new(DevShared {
            bdev,
            writable: true,
            writeback: AtomicBool::new(true),
            id: [0; blk::ID_BYTES],
            conn: back.try_clone().expect("clone"),
            completed: AtomicU64::new(0),
            coalescing: Default::default(),
        });
        // The caller's clone of the socket outlives the connection.
        let keep = dev.clone();
        let h = rt.handle();
        let t = std::thread::spawn(move || {
            serve_connection(dev, back, &h, 0, 1, 512).map(|e| e.to_string())
        });
        front.write_all(bytes).expect("send");
        front
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = Vec::new();
        front.read_to_end(&mut got).expect("the connection ends");
        let why = t.join().expect("serve_connection");
        drop(keep);
        rt.shutdown();
        (got, why)
    }

    #[test]
    fn a_refused_message_ends_the_connection_though_a_clone_of_its_socket_lives() {
        // GET_FEATURES is answered; SET_VRING_NUM of queue 7 (of 1) is refused.
        let mut m = msg(1, &[]);
        m.extend(msg(8, &[7, 0, 0, 0, 16, 0, 0, 0]));
        let (got, why) = serve(&m);
        assert_eq!(got.len(), 20, "the GET_FEATURES reply: {got:?}");
        let f = u64::from_le_bytes(got[12..20].try_into().unwrap());
        assert_ne!(f & blk::feature::VERSION_1, 0);
        assert!(why.is_some(), "refused, not a hang-up");
    }
}

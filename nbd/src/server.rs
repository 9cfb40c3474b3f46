//! The NBD server: listeners accepting on the main reactor, connections spread
//! round-robin over the reactors, and the table of exports.

use super::addr::ListenAddr;
use super::conn;
use super::error::NbdError;
use super::export::{Export, ExportConfig, Kick};
use super::net::{Registration, Sock};
use bdev::device::Device;
use graph::events::EventBus;
use reactor::RuntimeHandle;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

/// How long a safe `block-export-del` waits for clients that are hanging up.
pub const SAFE_DEL_GRACE: Duration = Duration::from_secs(1);

/// Options of a server start.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Refuse connections beyond this many (0: no limit).
    pub max_connections: u32,
    /// Allow TCP addresses that are not loopback.
    pub allow_remote: bool,
    /// TLS credentials (server endpoint): clients must start TLS first.
    pub tls: Option<Arc<crate::tls::TlsCreds>>,
    /// Who may connect over TLS (`tls-authz`): the client certificate's name.
    pub authz: Option<Arc<crate::tls::AuthzSimple>>,
}

/// One started server (what `nbd-server-start` creates and `nbd-server-stop` ends).
/// Longest `nbd-server-stop` waits for its connections to close.
const STOP_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Instance {
    rt: RuntimeHandle,
    events: Option<EventBus>,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    conns: Mutex<Vec<Weak<Kick>>>,
    live: AtomicUsize,
    next_reactor: AtomicUsize,
    max_connections: u32,
    /// TLS required, with these credentials.
    pub(crate) tls: Option<Arc<crate::tls::TlsCreds>>,
    /// And this access control.
    pub(crate) authz: Option<Arc<crate::tls::AuthzSimple>>,
    listeners: Mutex<Vec<Arc<Kick>>>,
    listener_tasks: Mutex<Vec<reactor::JoinHandle<()>>>,
}

/// A connection counted on its server instance (dropping it uncounts).
pub(crate) struct ConnSlot {
    pub(crate) inst: Arc<Instance>,
    /// The connection's stop request.
    pub kick: Arc<Kick>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.inst.live.fetch_sub(1, Ordering::SeqCst);
        let me = Arc::as_ptr(&self.kick);
        self.inst
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| k.strong_count() > 0 && k.as_ptr() != me);
    }
}

impl Instance {
    /// The export a client asks for by name, unless it is closing.
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Export>> {
        let m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .find(|e| e.cfg.name == name && !e.is_closing())
            .cloned()
    }

    /// Names and descriptions of the open exports.
    pub(crate) fn list(&self) -> Vec<(String, String)> {
        let m = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .filter(|e| !e.is_closing())
            .map(|e| (e.cfg.name.clone(), e.cfg.description.clone()))
            .collect()
    }

    fn open_conn(self: &Arc<Self>) -> ConnSlot {
        let kick = Arc::new(Kick::default());
        self.live.fetch_add(1, Ordering::SeqCst);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&kick));
        ConnSlot {
            inst: self.clone(),
            kick,
        }
    }

    fn dispatch(self: &Arc<Self>, sock: Sock) {
        if self.max_connections > 0
            && self.live.load(Ordering::SeqCst) >= self.max_connections as usize
        {
            tracing::warn!(peer = %sock.peer(), max = self.max_connections, "NBD connection refused: too many connections");
            return;
        }
        if let Err(e) = sock.prepare() {
            tracing::warn!(error = %e, "NBD connection dropped: cannot make the socket non-blocking");
            return;
        }
        let slot = self.open_conn();
        let n = self.rt.num_reactors().max(1);
        let target = self.next_reactor.fetch_add(1, Ordering::Relaxed) % n;
        let res = self.rt.send(target, move || {
            reactor::spawn_local(conn::serve(sock, slot));
        });
        if res.is_err() {
            tracing::debug!("NBD connection dropped: the runtime is stopping");
        }
    }

    /// Waits until every (stopped) listener has closed its socket.
    fn join_listeners(&self) {
        let tasks: Vec<_> = self
            .listener_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in tasks {
            let _ = t.block();
        }
    }

    /// Waits up to `timeout` for every connection to close; `false` if some
    /// are still open then.
    fn wait_closed(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while self.live.load(Ordering::SeqCst) > 0 && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.live.load(Ordering::SeqCst) == 0
    }

    fn close_all(&self) {
        for k in self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            k.kick();
        }
        let exports: Vec<Arc<Export>> = self
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for e in exports {
            e.close_hard();
        }
        let conns: Vec<Arc<Kick>> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for k in conns {
            k.kick();
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn accept(&self) -> io::Result<Sock> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Sock::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Sock::Unix(s)),
        }
    }
    fn fd(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bind(addr: &ListenAddr) -> Result<Vec<Listener>, NbdError> {
    let err = |source| NbdError::Listen {
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Unix(path) => {
            if let Ok(md) = std::fs::symlink_metadata(path) {
                if md.file_type().is_socket() {
                    // A stale socket of an earlier run: nobody can be listening on it
                    // unless it answers.
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "a server is already listening there",
                        )));
                    }
                    let _ = std::fs::remove_file(path);
                } else {
                    return Err(err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "path exists and is not a socket",
                    )));
                }
            }
            let l = UnixListener::bind(path).map_err(err)?;
            l.set_nonblocking(true).map_err(err)?;
            Ok(vec![Listener::Unix(l, path.clone())])
        }
        ListenAddr::Tcp { .. } => {
            let mut out = Vec::new();
            let mut last = None;
            for sa in addr.resolve()? {
                match TcpListener::bind(sa) {
                    Ok(l) => {
                        l.set_nonblocking(true).map_err(err)?;
                        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "NBD server listening");
                        out.push(Listener::Tcp(l));
                    }
                    Err(e) => last = Some(e),
                }
            }
            match (out.is_empty(), last) {
                (true, Some(e)) => Err(err(e)),
                _ => Ok(out),
            }
        }
    }
}

async fn accept_loop(l: Listener, inst: Weak<Instance>, stop: Arc<Kick>) {
    let reg = match Registration::new(l.fd()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "NBD listener cannot be polled");
            return;
        }
    };
    poll_fn(|cx| {
        stop.set_waker(cx.waker());
        Poll::Ready(())
    })
    .await;
    loop {
        if stop.is_set() {
            break;
        }
        poll_fn(|cx| {
            if stop.is_set() {
                Poll::Ready(())
            } else {
                reg.poll_readable(cx)
            }
        })
        .await;
        if stop.is_set() {
            break;
        }
        match l.accept() {
            Ok(sock) => match inst.upgrade() {
                Some(i) => i.dispatch(sock),
                None => break,
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => reg.clear_readable(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: keep the listener, back off a little.
                tracing::warn!(error = %e, "NBD accept failed");
                reactor::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(reg);
    drop(l);
}

/// An NBD server: at most one running instance at a time, its exports. The
/// daemon keeps one in its service context; nothing here is process-wide.
#[derive(Default)]
pub struct NbdServer {
    inner: Mutex<Option<Arc<Instance>>>,
    allow_remote: AtomicBool,
}

/// One row of `query-block-exports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export id.
    pub id: String,
    /// Exported node: the node the export is attached to now (a snapshot
    /// of an exported plain node moves the export onto the overlay).
    pub node: String,
    /// Name clients use.
    pub name: String,
    /// Whether it is going away.
    pub shutting_down: bool,
    /// Attached connections.
    pub connections: usize,
}

impl ExportInfo {
    /// QEMU's `BlockExportInfo`.
    pub fn to_qmp(&self) -> Value {
        json!({"type": "nbd", "id": self.id, "node-name": self.node, "shutting-down": self.shutting_down})
    }
}

impl NbdServer {
    fn current(&self) -> Option<Arc<Instance>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Allows non-loopback TCP addresses for every later start (`--nbd-allow-remote`).
    pub fn set_allow_remote(&self, yes: bool) {
        self.allow_remote.store(yes, Ordering::SeqCst);
    }

    /// Whether a server is running.
    pub fn is_running(&self) -> bool {
        self.current().is_some()
    }

    /// Starts listening on `addrs`; accepting runs on reactor 0, connections on
    /// every reactor. `events` gets `BLOCK_EXPORT_DELETED`.
    pub fn start(
        &self,
        rt: &RuntimeHandle,
        events: Option<EventBus>,
        addrs: &[ListenAddr],
        opts: StartOptions,
    ) -> Result<(), NbdError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some() {
            return Err(NbdError::AlreadyRunning);
        }
        if addrs.is_empty() {
            return Err(NbdError::Invalid("no listen address".into()));
        }
        for a in addrs {
            if !(opts.allow_remote || self.allow_remote.load(Ordering::SeqCst) || a.is_local()?) {
                return Err(NbdError::BadAddress {
                    addr: a.to_string(),
                    why: "not a loopback address (start sluice with --nbd-allow-remote to serve other hosts)".into(),
                });
            }
        }
        let mut listeners = Vec::new();
        for a in addrs {
            listeners.extend(bind(a)?);
        }
        let inst = Arc::new(Instance {
            rt: rt.clone(),
            events,
            exports: Mutex::new(BTreeMap::new()),
            conns: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            next_reactor: AtomicUsize::new(0),
            max_connections: opts.max_connections,
            tls: opts.tls.clone(),
            authz: opts.authz.clone(),
            listeners: Mutex::new(Vec::new()),
            listener_tasks: Mutex::new(Vec::new()),
        });
        for l in listeners {
            let stop = Arc::new(Kick::default());
            inst.listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(stop.clone());
            let weak = Arc::downgrade(&inst);
            let started = rt.call_on(0, move || reactor::spawn_local(accept_loop(l, weak, stop)));
            match started.block() {
                Ok(task) => inst
                    .listener_tasks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(task),
                Err(e) => {
                    inst.close_all();
                    inst.join_listeners();
                    return Err(e.into());
                }
            }
        }
        for a in addrs {
            tracing::info!(addr = %a, "NBD server started");
        }
        *g = Some(inst);
        Ok(())
    }

    /// Stops listening and closes every export (connections finish what is in
    /// flight, then close), and waits up to 5 s for them to be gone, as QEMU's
    /// `nbd-server-stop` does; see [`NbdServer::shutdown`].
    pub fn stop(&self) -> Result<(), NbdError> {
        let inst = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(NbdError::NotRunning)?;
        inst.close_all();
        inst.join_listeners();
        // As QEMU's nbd-server-stop: when it returns, the exports' connections
        // are gone, so their nodes can be deleted at once.
        if !inst.wait_closed(STOP_WAIT) {
            tracing::warn!("NBD connections still closing after nbd-server-stop");
        }
        tracing::info!("NBD server stopped");
        Ok(())
    }

    /// Stops (if running) and waits up to `timeout` for every connection to close.
    pub fn shutdown(&self, timeout: Duration) {
        let inst = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(inst) = inst {
            inst.close_all();
            inst.join_listeners();
            if !inst.wait_closed(timeout) {
                let left = inst.live.load(Ordering::SeqCst);
                tracing::warn!(connections = left, "NBD connections still open at shutdown");
            }
        }
    }

    /// Connections open now (handshaking or attached).
    pub fn connections(&self) -> usize {
        self.current()
            .map(|i| i.live.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Exports `cfg.node` (a bdev or device in `nodes`), claiming it.
    pub fn add_export(
        &self,
        nodes: &Arc<bdev::Registry>,
        cfg: ExportConfig,
    ) -> Result<(), NbdError> {
        let inst = self.current().ok_or(NbdError::NotRunning)?;
        if cfg.id.is_empty() {
            return Err(NbdError::Invalid("id: must not be empty".into()));
        }
        if cfg.name.len() > super::proto::MAX_STRING || cfg.name.contains('\0') {
            return Err(NbdError::Invalid("name: at most 4096 bytes, no NUL".into()));
        }
        let mut m = inst.exports.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&cfg.id) {
            return Err(NbdError::IdInUse(cfg.id));
        }
        if m.values()
            .any(|e| e.cfg.name == cfg.name && !e.is_closing())
        {
            return Err(NbdError::NameInUse(cfg.name));
        }
        let bdev = nodes.get(&cfg.node)?;
        if cfg.writable && bdev.read_only() {
            return Err(NbdError::ReadOnlyNode(cfg.node));
        }
        let claim = format!("nbd export {}", cfg.id);
        let holder = bdev::Holder::Export(claim.clone());
        // A plain node is exported through a hidden device over it (QEMU's
        // export BlockBackend), which a snapshot of the node moves onto the
        // overlay; a device (or raw node) is exported as it is.
        let hidden = Device::from_bdev(&bdev).is_none();
        let bdev = if hidden {
            Device::new_hidden(nodes, &claim, bdev)?
        } else {
            nodes.claim(&cfg.node, bdev::Claim::root(holder.clone(), cfg.writable))?;
            bdev
        };
        let weak = Arc::downgrade(&inst);
        let (id, node) = (cfg.id.clone(), cfg.node.clone());
        let events = inst.events.clone();
        let (exported, rt) = (bdev.clone(), inst.rt.clone());
        let nodes = nodes.clone();
        let on_gone = Box::new(move || {
            if let Some(i) = weak.upgrade() {
                i.exports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            if hidden {
                Device::close_hidden(&exported, &rt);
            } else {
                nodes.release(&node, &holder);
            }
            tracing::info!(id = %id, "NBD export deleted");
            if let Some(ev) = events {
                ev.publish("BLOCK_EXPORT_DELETED", json!({"id": id}));
            }
        });
        tracing::info!(id = %cfg.id, node = %cfg.node, name = %cfg.name, writable = cfg.writable, "NBD export added");
        let e = Export::new(cfg, bdev, on_gone);
        m.insert(e.cfg.id.clone(), e);
        Ok(())
    }

    /// Removes an export. `hard` disconnects its clients (after their in-flight
    /// requests); otherwise it fails while any client is still connected after
    /// [`SAFE_DEL_GRACE`] (a client that has just hung up is given that long to
    /// be seen gone).
    pub fn del_export(&self, id: &str, hard: bool) -> Result<(), NbdError> {
        let inst = self.current().ok_or(NbdError::NotRunning)?;
        let e = inst
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| NbdError::NoSuchExport(id.to_string()))?;
        if e.is_closing() {
            return Err(NbdError::NoSuchExport(id.to_string()));
        }
        if hard {
            e.close_hard();
        } else if !e.close_when_idle(SAFE_DEL_GRACE) {
            return Err(NbdError::InUse(id.to_string()));
        }
        Ok(())
    }

    /// Every export of the running server.
    pub fn exports(&self) -> Vec<ExportInfo> {
        let Some(inst) = self.current() else {
            return Vec::new();
        };
        let m = inst.exports.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .map(|e| ExportInfo {
                id: e.cfg.id.clone(),
                node: e.node_name(),
                name: e.cfg.name.clone(),
                shutting_down: e.is_closing(),
                connections: e.connections(),
            })
            .collect()
    }
}

//! The generic socket server both dialects use: a listener thread per socket,
//! a thread per connection (capped), and an orderly stop that lets each
//! connection finish the request it is serving.

use super::socket::{Conn, Listener};
use super::TransportError;
use crate::subsystem::Subsystem;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A wire protocol served on every accepted connection.
pub trait Protocol: Send + Sync + 'static {
    /// Serves one connection until the peer closes it or the server stops (its
    /// read side is then shut down). Runs on the connection's own thread.
    fn serve(&self, conn: Conn);
    /// Tells a client refused for being over the connection cap why, in the
    /// protocol's own error form (the connection is then closed).
    fn refuse(&self, conn: &mut Conn, message: &str);
}

/// Caps of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most simultaneous connections; the next one is refused with an error.
    pub max_connections: usize,
    /// Largest request in bytes.
    pub max_request: usize,
    /// How long one reply may take to reach a client that reads slowly or not
    /// at all before the connection is dropped (over the whole reply).
    pub write_timeout: Duration,
    /// How long a connection may stay without sending a byte while no call of
    /// its runs before it is closed (`None`: for ever). A request left half
    /// sent counts as idle too.
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_request: 4 << 20,
            write_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }
}

struct Shared {
    conns: Mutex<HashMap<u64, Conn>>,
    idle: Condvar,
    stopping: Arc<AtomicBool>,
}

impl Shared {
    fn stopping_flag(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no connection is left or `timeout` passes; returns how many remain.
    fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .idle
                .wait_timeout(g, deadline - now)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        g.len()
    }
}

/// A running server; [`Subsystem::stop`] stops it and removes its socket file.
pub struct Server {
    name: &'static str,
    desc: String,
    shared: Arc<Shared>,
    waker: UnixStream,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts accepting on `listener`, serving each connection with `proto`.
    pub fn start(
        name: &'static str,
        listener: Listener,
        proto: Arc<dyn Protocol>,
        limits: Limits,
    ) -> Result<Server, TransportError> {
        let desc = listener.describe();
        let spawn_err = |source: io::Error| TransportError::Io {
            what: "starting the server on",
            path: desc.clone().into(),
            source,
        };
        listener.set_nonblocking(true).map_err(spawn_err)?;
        let (waker, wake_rx) = UnixStream::pair().map_err(spawn_err)?;
        let shared = Arc::new(Shared {
            conns: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
            stopping: Arc::new(AtomicBool::new(false)),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(name, listener, wake_rx, sh, proto, limits))
            .map_err(spawn_err)?;
        tracing::info!(server = name, at = %desc, "listening");
        Ok(Server {
            name,
            desc,
            shared,
            waker,
            accept: Some(accept),
        })
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Subsystem for Server {
    fn stop(mut self: Box<Self>) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = (&self.waker).write_all(b"x");
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // Let every connection finish the request it is serving, then close.
        for c in self.shared.lock().values() {
            let _ = c.shutdown(Shutdown::Read);
        }
        if self.shared.wait_idle(Duration::from_secs(5)) > 0 {
            for c in self.shared.lock().values() {
                let _ = c.shutdown(Shutdown::Both);
            }
            let left = self.shared.wait_idle(Duration::from_secs(1));
            if left > 0 {
                tracing::warn!(
                    server = self.name,
                    left,
                    "connections still busy at stop; detaching them"
                );
            }
        }
        tracing::info!(server = self.name, at = %self.desc, "stopped");
    }
}

fn accept_loop(
    name: &'static str,
    listener: Listener,
    wake_rx: UnixStream,
    shared: Arc<Shared>,
    proto: Arc<dyn Protocol>,
    limits: Limits,
) {
    let mut next_id = 0u64;
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(server = name, error = %e, "poll failed; no longer accepting");
                break;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        loop {
            match listener.accept() {
                Ok(conn) => {
                    next_id += 1;
                    admit(name, conn, next_id, &shared, &proto, limits);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(server = name, error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(20));
                    break;
                }
            }
        }
    }
    drop(wake_rx);
    drop(listener);
}

fn admit(
    name: &'static str,
    mut conn: Conn,
    id: u64,
    shared: &Arc<Shared>,
    proto: &Arc<dyn Protocol>,
    limits: Limits,
) {
    let _ = conn.set_blocking();
    let _ = conn.set_write_timeout(Some(limits.write_timeout));
    let _ = conn.set_read_timeout(limits.idle_timeout);
    let clone = {
        let mut m = shared.lock();
        if m.len() >= limits.max_connections {
            drop(m);
            tracing::warn!(
                server = name,
                max = limits.max_connections,
                "connection refused: too many connections"
            );
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            proto.refuse(
                &mut conn,
                &format!(
                    "too many connections (the limit is {})",
                    limits.max_connections
                ),
            );
            return;
        }
        match conn.try_clone() {
            Ok(c) => {
                m.insert(id, c);
            }
            Err(e) => {
                tracing::warn!(server = name, error = %e, "cannot track connection");
                return;
            }
        }
        shared.clone()
    };
    let p = proto.clone();
    let watch = match conn.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(server = name, error = %e, "cannot watch connection");
            if let Some(mut c) = shared.lock().remove(&id) {
                proto.refuse(&mut c, "the server cannot take more connections now");
            }
            return;
        }
    };
    let stopping = shared.stopping_flag();
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-conn"))
        .spawn(move || {
            tracing::debug!(server = name, id, "connection opened");
            let _watch = super::call::enter(watch, stopping);
            p.serve(conn);
            clone.lock().remove(&id);
            clone.idle.notify_all();
            tracing::debug!(server = name, id, "connection closed");
        });
    if let Err(e) = spawned {
        tracing::warn!(server = name, error = %e, "cannot start a connection thread");
        if let Some(mut c) = shared.lock().remove(&id) {
            proto.refuse(&mut c, "the server cannot take more connections now");
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Reads from `conn` into `buf`, retrying on EINTR; 0 means end of stream
/// (or a read error, or the idle timeout passing, which end the connection
/// the same way).
pub fn read_some(conn: &mut Conn, buf: &mut [u8]) -> usize {
    loop {
        match conn.read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                tracing::info!("closing a connection idle past the idle timeout");
                return 0;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection read failed");
                return 0;
            }
        }
    }
}

//! The QMP server: QEMU's monitor protocol on its own Unix socket, over the same
//! method table as JSON-RPC.
//!
//! Input is read as QEMU reads it ([`json`]: a bad token costs one error and
//! what follows is still run); output is written as QEMU writes it
//! ([`writer`]), each line ending with CRLF and reaching the client within the
//! write limit or the connection is dropped. After `qmp_capabilities`, a
//! connection subscribes to the service's event bus and a writer thread pushes
//! every QMP event (`{"event", "data", "timestamp"}`), interleaved with the replies.
//! SPDK's notifications on the same bus (`bdev_register`, ...; lower-case
//! names no QMP client expects) stay on the JSON-RPC side
//! (`notify_get_notifications`).

pub mod json;
pub mod schema;
pub mod session;
pub mod writer;

use crate::error::ErrorClass;
use crate::service::Service;
use crate::transport::{self, server::read_some, Conn, Limits, Protocol, Server, TransportError};
use graph::events::Event;
use session::{Effect, Session};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often an idle event writer checks whether its connection closed.
const EVENT_POLL: Duration = Duration::from_millis(100);

/// The QMP protocol over one service.
pub struct Qmp {
    svc: Weak<Service>,
    max_request: usize,
    write_timeout: Duration,
}

impl Qmp {
    /// The protocol for `svc` (held weakly).
    pub fn new(svc: &Arc<Service>, limits: Limits) -> Self {
        Self {
            svc: Arc::downgrade(svc),
            max_request: limits.max_request,
            write_timeout: limits.write_timeout,
        }
    }
}

/// The write side of a connection, shared by the reader (replies) and the
/// event writer, with the time one line may take to go out.
#[derive(Clone)]
struct Writer {
    conn: Arc<Mutex<Conn>>,
    limit: Duration,
}

/// Writes one line within `limit` in all (a client reading slowly cannot
/// stretch it); `false` when the connection is to be dropped.
fn write_line(c: &mut Conn, line: &str, limit: Duration) -> bool {
    let mut out = Vec::with_capacity(line.len() + 2);
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
    match c.write_all_within(&out, limit) {
        Ok(()) => true,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::info!(
                    limit_s = limit.as_secs_f64(),
                    "QMP client does not read; dropping it"
                );
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            false
        }
    }
}

fn lock(w: &Writer) -> std::sync::MutexGuard<'_, Conn> {
    w.conn.lock().unwrap_or_else(|p| p.into_inner())
}

fn send(w: &Writer, line: &str) -> bool {
    write_line(&mut lock(w), line, w.limit)
}

/// Whether `name` is a QMP event (QEMU's upper-case names), not one of
/// SPDK's notifications.
pub fn is_qmp_event(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Pushes events to one negotiated client until its connection closes; then
/// writes what was already published and ends.
fn start_event_writer(
    rx: Receiver<Event>,
    w: Writer,
    closed: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("qmp-events".into())
        .stack_size(256 << 10)
        .spawn(move || loop {
            match rx.recv_timeout(EVENT_POLL) {
                Ok(ev) if !is_qmp_event(&ev.name) => {}
                Ok(ev) => {
                    if !send(&w, &writer::to_qemu(&ev.to_qmp())) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if closed.load(Ordering::Acquire) {
                        for ev in rx.try_iter().filter(|e| is_qmp_event(&e.name)) {
                            if !send(&w, &writer::to_qemu(&ev.to_qmp())) {
                                return;
                            }
                        }
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the QMP event writer; this client gets no events");
            None
        }
    }
}

impl Protocol for Qmp {
    fn serve(&self, mut conn: Conn) {
        let writer = match conn.try_clone() {
            Ok(c) => Writer {
                conn: Arc::new(Mutex::new(c)),
                limit: self.write_timeout,
            },
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection cannot be cloned");
                return;
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        let mut events = None;
        self.session(&mut conn, &writer, &closed, &mut events);
        closed.store(true, Ordering::Release);
        // The event writer sees `closed` within EVENT_POLL and ends on its
        // own (its writes to a closed socket fail at once): not joined, so
        // that a server stopping (`quit`) does not wait for it.
        drop(events);
    }

    fn refuse(&self, conn: &mut Conn, message: &str) {
        let line = session::error_reply(ErrorClass::GenericError, message, None) + "\r\n";
        let _ = conn.write_all(line.as_bytes());
    }
}

impl Qmp {
    fn session(
        &self,
        conn: &mut Conn,
        writer: &Writer,
        closed: &Arc<AtomicBool>,
        events: &mut Option<JoinHandle<()>>,
    ) {
        if !send(writer, &writer::to_qemu(&session::greeting())) {
            return;
        }
        let mut state = Session::default();
        let mut stream = json::Stream::new(
            self.max_request,
            format!(
                "JSON parse error, QMP input exceeds the maximum size of {} bytes",
                self.max_request
            ),
        );
        let mut items = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = read_some(conn, &mut buf);
            if n == 0 {
                return;
            }
            stream.feed(&buf[..n], &mut items);
            for item in items.drain(..) {
                let Some(svc) = self.svc.upgrade() else {
                    return;
                };
                // The output is held while the command runs: the events it
                // causes reach this client after its reply (as QEMU's
                // SHUTDOWN follows the return of `quit`), and the reply to
                // qmp_capabilities precedes every event.
                let mut out = lock(writer);
                let (line, effect) = state.handle_item(&svc, item);
                let rx = (effect == Effect::StartEvents).then(|| svc.events.subscribe());
                if !write_line(&mut out, &line, writer.limit) {
                    return;
                }
                drop(out);
                if let Some(rx) = rx {
                    *events = start_event_writer(rx, writer.clone(), closed.clone());
                }
            }
        }
    }
}

/// Starts QMP on a Unix socket.
pub fn start_unix(
    svc: &Arc<Service>,
    path: &Path,
    limits: Limits,
) -> Result<Server, TransportError> {
    let l = transport::bind_unix(path)?;
    // A negotiated QMP client may wait for events for hours: no idle timeout.
    let limits = Limits {
        idle_timeout: None,
        ..limits
    };
    Server::start("qmp", l, Arc::new(Qmp::new(svc, limits)), limits)
}

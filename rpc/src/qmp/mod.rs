//! The QMP server: QEMU's monitor protocol on its own Unix socket, over the same
//! method table as JSON-RPC.
//!
//! Each line sent ends with CRLF. After `qmp_capabilities`, a connection
//! subscribes to the service's event bus and a writer thread pushes every QMP
//! event (`{"event", "data", "timestamp"}`), interleaved with the replies.
//! SPDK's notifications on the same bus (`bdev_register`, ...; lower-case
//! names no QMP client expects) stay on the JSON-RPC side
//! (`notify_get_notifications`).

pub mod session;

use crate::error::ErrorClass;
use crate::service::Service;
use crate::transport::{
    self, server::read_some, Conn, Frame, Limits, Protocol, Server, Splitter, TransportError,
};
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
}

impl Qmp {
    /// The protocol for `svc` (held weakly).
    pub fn new(svc: &Arc<Service>, limits: Limits) -> Self {
        Self {
            svc: Arc::downgrade(svc),
            max_request: limits.max_request,
        }
    }
}

/// The write side of a connection, shared by the reader (replies) and the event writer.
type Writer = Arc<Mutex<Conn>>;

fn write_line(c: &mut Conn, line: &str) -> bool {
    let mut out = Vec::with_capacity(line.len() + 2);
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
    c.write_all(&out).is_ok()
}

fn lock(w: &Writer) -> std::sync::MutexGuard<'_, Conn> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

fn send(w: &Writer, line: &str) -> bool {
    write_line(&mut lock(w), line)
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
                    if !send(&w, &ev.to_qmp().to_string()) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if closed.load(Ordering::Acquire) {
                        for ev in rx.try_iter().filter(|e| is_qmp_event(&e.name)) {
                            if !send(&w, &ev.to_qmp().to_string()) {
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
        let writer: Writer = match conn.try_clone() {
            Ok(c) => Arc::new(Mutex::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection cannot be cloned");
                return;
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        let mut events = None;
        self.session(&mut conn, &writer, &closed, &mut events);
        closed.store(true, Ordering::Release);
        if let Some(h) = events {
            let _ = h.join();
        }
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
        if !send(writer, &session::greeting().to_string()) {
            return;
        }
        let mut state = Session::default();
        let mut split = Splitter::new(self.max_request);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = read_some(conn, &mut buf);
            if n == 0 {
                return;
            }
            split.feed(&buf[..n]);
            while let Some(frame) = split.next_frame() {
                let line = match frame {
                    Frame::Value(text) => {
                        let Some(svc) = self.svc.upgrade() else {
                            return;
                        };
                        // The output is held while the command runs: the events it
                        // causes reach this client after its reply (as QEMU's
                        // SHUTDOWN follows the return of `quit`), and the reply to
                        // qmp_capabilities precedes every event.
                        let mut out = lock(writer);
                        let (line, effect) = state.handle_text(&svc, &text);
                        let rx = (effect == Effect::StartEvents).then(|| svc.events.subscribe());
                        if !write_line(&mut out, &line) {
                            return;
                        }
                        drop(out);
                        if let Some(rx) = rx {
                            *events = start_event_writer(rx, writer.clone(), closed.clone());
                        }
                        continue;
                    }
                    Frame::TooLarge => session::error_reply(
                        ErrorClass::GenericError,
                        &format!(
                            "JSON parse error, QMP input exceeds the maximum size of {} bytes",
                            self.max_request
                        ),
                        None,
                    ),
                    Frame::Garbage { byte } => session::error_reply(
                        ErrorClass::GenericError,
                        &format!(
                            "JSON parse error, invalid token starting with {:?}",
                            byte as char
                        ),
                        None,
                    ),
                };
                if !send(writer, &line) {
                    return;
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
    Server::start("qmp", l, Arc::new(Qmp::new(svc, limits)), limits)
}

//! The JSON-RPC 2.0 server (SPDK's dialect) on a Unix socket and, optionally, TCP.
//!
//! Requests are cut from the byte stream without any delimiter (SPDK's client
//! sends pretty-printed JSON with no newline, several per connection); each is
//! answered in order, on the connection's own thread, with a reply ending in a
//! newline. A request that is not JSON gets -32700; when the stream cannot be
//! resynchronised (bytes that cannot start a request, or a request that can
//! never become valid JSON, reported at its first bad byte) the connection is
//! closed after that reply, as SPDK does.

pub mod request;

use crate::error::codes;
use crate::service::Service;
use crate::transport::{
    self, server::read_some, Conn, Frame, Limits, Listener, Protocol, Server, Splitter,
    TransportError,
};
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The JSON-RPC protocol over one service.
pub struct JsonRpc {
    svc: Weak<Service>,
    max_request: usize,
    write_timeout: Duration,
}

impl JsonRpc {
    /// The protocol for `svc` (held weakly: the server never keeps the service alive).
    pub fn new(svc: &Arc<Service>, limits: Limits) -> Self {
        Self {
            svc: Arc::downgrade(svc),
            max_request: limits.max_request,
            write_timeout: limits.write_timeout,
        }
    }
}

/// Sends one reply line within `limit` (the whole line, however slowly the
/// client reads); `false` when the connection is to be dropped.
fn send(conn: &mut Conn, mut line: String, limit: Duration) -> bool {
    line.push('\n');
    match conn.write_all_within(line.as_bytes(), limit) {
        Ok(()) => true,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::info!(
                    limit_s = limit.as_secs_f64(),
                    "JSON-RPC client does not read its reply; dropping it"
                );
            }
            false
        }
    }
}

impl Protocol for JsonRpc {
    fn serve(&self, mut conn: Conn) {
        let mut split = Splitter::new(self.max_request);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = read_some(&mut conn, &mut buf);
            if n == 0 {
                if split.has_partial() {
                    tracing::debug!("JSON-RPC connection closed in the middle of a request");
                }
                return;
            }
            split.feed(&buf[..n]);
            while let Some(frame) = split.next_frame() {
                let reply = match frame {
                    Frame::Value(text) => {
                        let Some(svc) = self.svc.upgrade() else {
                            return;
                        };
                        request::handle_text(&svc, &text)
                    }
                    Frame::TooLarge => Some(request::error_reply(
                        &Value::Null,
                        codes::INVALID_REQUEST,
                        &format!(
                            "Invalid request: request exceeds the maximum size of {} bytes",
                            self.max_request
                        ),
                    )),
                    Frame::Garbage { byte } => {
                        let msg = format!(
                            "Parse error: unexpected character {:?} where a request should start",
                            byte as char
                        );
                        send(
                            &mut conn,
                            request::error_reply(&Value::Null, codes::PARSE_ERROR, &msg),
                            self.write_timeout,
                        );
                        return;
                    }
                    Frame::Invalid { at, why } => {
                        // As SPDK's jsonrpc_server: the error, then the connection closes.
                        let msg = format!("Parse error: {why} at byte {at} of the request");
                        send(
                            &mut conn,
                            request::error_reply(&Value::Null, codes::PARSE_ERROR, &msg),
                            self.write_timeout,
                        );
                        return;
                    }
                };
                if let Some(r) = reply {
                    if !send(&mut conn, r, self.write_timeout) {
                        return;
                    }
                }
            }
        }
    }

    fn refuse(&self, conn: &mut Conn, message: &str) {
        send(
            conn,
            request::error_reply(&Value::Null, codes::INTERNAL_ERROR, message),
            Duration::from_secs(1),
        );
    }
}

/// Starts JSON-RPC on a Unix socket.
pub fn start_unix(
    svc: &Arc<Service>,
    path: &Path,
    limits: Limits,
) -> Result<Server, TransportError> {
    let l = transport::bind_unix(path)?;
    start_on(svc, l, limits)
}

/// Starts JSON-RPC on TCP (`allow_remote` permits a non-loopback address).
pub fn start_tcp(
    svc: &Arc<Service>,
    addr: &str,
    allow_remote: bool,
    limits: Limits,
) -> Result<Server, TransportError> {
    let l = transport::bind_tcp(addr, allow_remote)?;
    start_on(svc, l, limits)
}

/// Starts JSON-RPC on a listener already bound.
pub fn start_on(
    svc: &Arc<Service>,
    listener: Listener,
    limits: Limits,
) -> Result<Server, TransportError> {
    Server::start(
        "jsonrpc",
        listener,
        Arc::new(JsonRpc::new(svc, limits)),
        limits,
    )
}

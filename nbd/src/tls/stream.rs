//! A TLS session over a non-blocking socket, read and written by the code that
//! reads and writes plain sockets ([`crate::net::Sock`]).
//!
//! Reads: plaintext rustls already holds comes first; when it has none, the
//! socket is read and the records processed, until the caller's buffer is full
//! or the socket would block. So a read comes back short only when the socket
//! would block (or at the end of the stream), which keeps the edge-triggered
//! rule of [`crate::net`] ("a short read drained the socket") true.
//!
//! Writes: queued ciphertext is sent first; then the caller's plaintext is
//! encrypted a chunk at a time and sent. Plaintext is reported as written only
//! once all of its ciphertext is on the socket: when the socket fills, the
//! encrypted chunk is held (`held`), the write reports what went out before it
//! (or "would block"), and the caller's next write, which starts again at the
//! first byte not reported, sends the rest and reports the held chunk. Every
//! writer here (the server's reply queue, [`crate::net::AsyncSock::write_all`])
//! resends what was not reported, so nothing is stranded in rustls.
//!
//! The two halves of a client connection (reader and writer, each with its own
//! fd) share one session through a mutex that is never contended for long (one
//! reactor runs both).

use crate::net::{AsyncSock, Sock};
use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most plaintext encrypted per step of a write.
const CHUNK: usize = 256 << 10;

struct State {
    conn: rustls::Connection,
    /// Plaintext encrypted (its ciphertext queued in `conn`) but not yet
    /// reported to the writer.
    held: usize,
}

/// A TLS session over a plain socket.
pub struct TlsSock {
    io: Sock,
    st: Arc<Mutex<State>>,
}

impl TlsSock {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it cannot leave the session half-updated in a way
        // that matters more than the panic itself; keep going.
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plain socket under the session.
    pub fn inner(&self) -> &Sock {
        &self.io
    }

    /// A second handle on the same session over a duplicate of the fd (the
    /// client's reader half).
    pub fn try_clone(&self) -> io::Result<TlsSock> {
        Ok(TlsSock {
            io: self.io.try_clone()?,
            st: self.st.clone(),
        })
    }

    /// The peer's certificate (DER), once the handshake is done.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let st = self.lock();
        st.conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
    }

    /// Sends a close_notify (best effort) and shuts the socket down.
    pub fn shutdown(&mut self) {
        self.close_notify();
        self.io.shutdown();
    }

    /// Sends a close_notify (best effort).
    fn close_notify(&mut self) {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        st.conn.send_close_notify();
        while st.conn.wants_write() {
            if st.conn.write_tls(&mut self.io).is_err() {
                break;
            }
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e))
}

/// A TLS protocol failure (certificate refused, bad record), as an I/O error's cause.
#[derive(Debug)]
pub struct TlsFailure(pub rustls::Error);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

impl std::error::Error for TlsFailure {}

impl Read for TlsSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let st = &mut *self.st.lock().unwrap_or_else(|p| p.into_inner());
        let mut got = 0;
        loop {
            if got == buf.len() {
                return Ok(got);
            }
            match st.conn.reader().read(&mut buf[got..]) {
                // close_notify: the end of the stream.
                Ok(0) => return Ok(got),
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: the end too (QEMU does).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(got),
                Err(e) => return if got > 0 { Ok(got) } else { Err(e) },
            }
            match st.conn.read_tls(&mut self.io) {
                // Seen by the reader on the next turn.
                Ok(0) => {}
                Ok(_) => {
                    if let Err(e) = st.conn.process_new_packets() {
                        // Tell the peer why (an alert), best effort.
                        let _ = st.conn.write_tls(&mut self.io);
                        return if got > 0 { Ok(got) } else { Err(tls_error(e)) };
                    }
                }
                Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) => return if got > 0 { Ok(got) } else { Err(e) },
            }
        }
    }
}

impl Write for TlsSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let st = &mut *self.st.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        loop {
            while st.conn.wants_write() {
                match st.conn.write_tls(&mut self.io) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if done > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(done),
                    Err(e) => return Err(e),
                }
            }
            done += std::mem::take(&mut st.held);
            if done >= total {
                return Ok(total.min(done));
            }
            // The plaintext from `done` on, at most CHUNK bytes of it.
            let mut skip = done;
            let mut want = CHUNK;
            let mut part: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
            for b in bufs {
                if want == 0 {
                    break;
                }
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                let end = b.len().min(skip + want);
                part.push(IoSlice::new(&b[skip..end]));
                want -= end - skip;
                skip = 0;
            }
            let k = st.conn.writer().write_vectored(&part)?;
            if k == 0 {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            st.held = k;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs the TLS handshake on `s` (after `NBD_OPT_STARTTLS` was agreed): the
/// socket becomes a [`TlsSock`] and the handshake is driven by readiness. The
/// error says why the peer was refused (or why it refused us).
pub async fn handshake(s: &mut AsyncSock, conn: rustls::Connection) -> io::Result<()> {
    s.sock
        .start_tls(Arc::new(Mutex::new(State { conn, held: 0 })))?;
    loop {
        let Sock::Tls(t) = &mut s.sock else {
            return Err(io::Error::other("the socket lost its TLS session"));
        };
        let (wants_write, handshaking) = {
            let st = t.lock();
            (st.conn.wants_write(), st.conn.is_handshaking())
        };
        if wants_write {
            let r = {
                let mut st = t.st.lock().unwrap_or_else(|p| p.into_inner());
                st.conn.write_tls(&mut t.io)
            };
            match r {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.reg.clear_writable();
                    poll_fn(|cx| s.reg.poll_writable(cx)).await;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !handshaking {
            break;
        }
        let r = {
            let mut st = t.st.lock().unwrap_or_else(|p| p.into_inner());
            match st.conn.read_tls(&mut t.io) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )),
                Ok(_) => match st.conn.process_new_packets() {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        // Send the alert that says why, best effort.
                        while st.conn.wants_write() {
                            if st.conn.write_tls(&mut t.io).is_err() {
                                break;
                            }
                        }
                        Err(tls_error(e))
                    }
                },
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.reg.clear_readable();
                poll_fn(|cx| s.reg.poll_readable(cx)).await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Records read with the last flight may hold plaintext already: the next
    // read must look before waiting for an edge.
    s.reg.mark_readable();
    Ok(())
}

impl Sock {
    /// Puts a TLS session over this (plain) socket. (The socket is moved out
    /// from behind `&mut` by leaving an unconnected placeholder there for an instant.)
    fn start_tls(&mut self, st: Arc<Mutex<State>>) -> io::Result<()> {
        if self.is_tls() {
            return Err(io::Error::other("TLS is already running on this socket"));
        }
        let placeholder = Sock::Unix(std::os::unix::net::UnixStream::pair()?.0);
        let io = std::mem::replace(self, placeholder);
        *self = Sock::Tls(Box::new(TlsSock { io, st }));
        Ok(())
    }
}

//! The fixed newstyle handshake: greeting, client flags, and option haggling
//! (EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY,
//! LIST/SET_META_CONTEXT with `base:allocation`).
//!
//! TLS as QEMU's server does it (nbd/server.c): a server with credentials
//! answers every option but `STARTTLS` and `ABORT` with `NBD_REP_ERR_TLS_REQD`
//! until TLS runs, and drops a client that sends `EXPORT_NAME` before it; after
//! the TLS handshake (and the `tls-authz` check) the haggle starts over inside
//! the session. Without credentials `STARTTLS` gets `NBD_REP_ERR_POLICY`.

use super::export::{Attached, Export, Kick};
use super::net::AsyncSock;
use super::proto::{self, info, opt, rep, Cursor, BASE_ALLOCATION, BASE_ALLOCATION_ID, MAX_STRING};
use super::server::Instance;
use std::io;
use std::sync::Arc;

/// Largest option payload read; longer ones are skipped and refused.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options longer than this end the connection (not worth reading through).
const MAX_SKIP_LEN: u32 = 16 << 20;

/// The outcome of a successful negotiation.
pub(crate) struct Negotiated {
    /// The export, with this connection counted on it.
    pub attached: Attached,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
}

/// Why the handshake ended without a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The socket failed or the client hung up.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection is dropped.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// TLS failed: the handshake, the client's certificate, or `tls-authz`.
    #[error("TLS: {0}")]
    Tls(String),
    /// The client aborted (`NBD_OPT_ABORT`).
    #[error("client aborted the negotiation")]
    Aborted,
    /// The export named by `NBD_OPT_EXPORT_NAME` does not exist (no way to say so).
    #[error("unknown export {0:?} requested with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
}

struct Haggle<'a> {
    s: &'a mut AsyncSock,
    inst: &'a Instance,
    kick: &'a Arc<Kick>,
    no_zeroes: bool,
    structured: bool,
    /// Export name the contexts were selected for, and whether base:allocation was.
    meta: Option<(String, bool)>,
    /// TLS runs on the socket.
    tls_on: bool,
}

/// Runs the handshake on `s`.
pub(crate) async fn negotiate(
    s: &mut AsyncSock,
    inst: &Instance,
    kick: &Arc<Kick>,
) -> Result<Negotiated, HandshakeError> {
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greet).await?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let mut h = Haggle {
        s,
        inst,
        kick,
        no_zeroes: cflags & proto::FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
        tls_on: false,
    };
    loop {
        let mut hdr = [0u8; 16];
        h.s.read_exact(&mut hdr).await?;
        if proto::be64(&hdr[0..8]) != proto::IHAVEOPT {
            return Err(HandshakeError::Protocol(
                "option without IHAVEOPT magic".into(),
            ));
        }
        let option = proto::be32(&hdr[8..12]);
        let len = proto::be32(&hdr[12..16]);
        if len > MAX_OPTION_LEN {
            if len > MAX_SKIP_LEN || option == opt::EXPORT_NAME {
                return Err(HandshakeError::Protocol(format!(
                    "option {option} with {len} bytes of data"
                )));
            }
            h.s.skip(len as u64).await?;
            h.reply(option, rep::ERR_TOO_BIG, b"option data too large")
                .await?;
            continue;
        }
        if h.inst.tls.is_some() && !h.tls_on && option != opt::STARTTLS && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::Protocol(
                    "Option 0x1 not permitted before TLS".into(),
                ));
            }
            h.s.skip(len as u64).await?;
            h.error(
                option,
                rep::ERR_TLS_REQD,
                &format!("Option {option:#x} not permitted before TLS"),
            )
            .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        h.s.read_exact(&mut data).await?;
        if let Some(done) = h.option(option, &data).await? {
            return Ok(done);
        }
    }
}

impl Haggle<'_> {
    async fn reply(&mut self, option: u32, ty: u32, data: &[u8]) -> io::Result<()> {
        self.s
            .write_all(&proto::option_reply(option, ty, data))
            .await
    }

    async fn error(&mut self, option: u32, ty: u32, msg: &str) -> io::Result<()> {
        self.reply(option, ty, proto::truncate_utf8(msg, MAX_STRING).as_bytes())
            .await
    }

    /// Handles one option; `Some` when transmission begins.
    async fn option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated>, HandshakeError> {
        if self.kick.is_set() && option != opt::ABORT {
            self.error(option, rep::ERR_SHUTDOWN, "server is shutting down")
                .await?;
            return Ok(None);
        }
        match option {
            opt::EXPORT_NAME => {
                let name = std::str::from_utf8(data)
                    .ok()
                    .filter(|n| n.len() <= MAX_STRING && !n.contains('\0'))
                    .ok_or_else(|| {
                        HandshakeError::Protocol("export name is not a valid string".into())
                    })?;
                let e = self
                    .inst
                    .find(name)
                    .ok_or_else(|| HandshakeError::UnknownExport(name.to_string()))?;
                let attached = e
                    .attach(self.kick)
                    .ok_or_else(|| HandshakeError::UnknownExport(name.to_string()))?;
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&e.bdev.size().to_be_bytes());
                v.extend_from_slice(&e.transmission_flags(self.structured).to_be_bytes());
                if !self.no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                self.s.write_all(&v).await?;
                let base_allocation = self.meta_for(name);
                Ok(Some(Negotiated {
                    attached,
                    structured: self.structured,
                    base_allocation,
                }))
            }
            opt::ABORT => {
                // The client may already have closed; a failed ACK does not matter.
                let _ = self.reply(option, rep::ACK, &[]).await;
                Err(HandshakeError::Aborted)
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.error(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    return Ok(None);
                }
                for (name, desc) in self.inst.list() {
                    let mut v = Vec::with_capacity(4 + name.len() + desc.len());
                    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    v.extend_from_slice(name.as_bytes());
                    v.extend_from_slice(desc.as_bytes());
                    self.reply(option, rep::SERVER, &v).await?;
                }
                self.reply(option, rep::ACK, &[]).await?;
                Ok(None)
            }
            opt::STARTTLS => {
                self.starttls(option, data).await?;
                Ok(None)
            }
            opt::INFO | opt::GO => self.info_go(option, data).await,
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if self.structured {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "structured replies already negotiated",
                    )
                    .await?;
                } else {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]).await?;
                }
                Ok(None)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data).await?;
                Ok(None)
            }
            _ => {
                self.error(
                    option,
                    rep::ERR_UNSUP,
                    &format!("option {option} is not supported"),
                )
                .await?;
                Ok(None)
            }
        }
    }

    /// `NBD_OPT_STARTTLS`: the TLS handshake on the socket, then the
    /// `tls-authz` check; a failure ends the connection.
    async fn starttls(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
        let Some(creds) = self.inst.tls.clone() else {
            self.error(option, rep::ERR_POLICY, "TLS not configured")
                .await?;
            return Ok(());
        };
        if self.tls_on {
            self.error(option, rep::ERR_INVALID, "TLS already enabled")
                .await?;
            return Ok(());
        }
        if !data.is_empty() {
            self.error(
                option,
                rep::ERR_INVALID,
                "OPT_STARTTLS should not have length",
            )
            .await?;
            return Ok(());
        }
        let session = creds.server_session().map_err(HandshakeError::Protocol)?;
        self.reply(option, rep::ACK, &[]).await?;
        crate::tls::stream::handshake(self.s, session)
            .await
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        if let Some(authz) = &self.inst.authz {
            let cert = match &self.s.sock {
                crate::net::Sock::Tls(t) => t.peer_certificate(),
                _ => None,
            };
            authz.check(cert.as_deref()).map_err(HandshakeError::Tls)?;
        }
        self.tls_on = true;
        Ok(())
    }

    /// Whether base:allocation was selected for export `name`.
    fn meta_for(&self, name: &str) -> bool {
        matches!(&self.meta, Some((n, true)) if n == name)
    }

    async fn info_go(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.lstring()?;
            let n = c.u16()?;
            let mut reqs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            c.at_end().then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.error(option, rep::ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
                .await?;
            return Ok(None);
        };
        let Some(e) = self.inst.find(name) else {
            self.error(
                option,
                rep::ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )
            .await?;
            return Ok(None);
        };
        self.send_info(option, &e, &reqs).await?;
        if option == opt::INFO {
            self.reply(option, rep::ACK, &[]).await?;
            return Ok(None);
        }
        let Some(attached) = e.attach(self.kick) else {
            self.error(
                option,
                rep::ERR_UNKNOWN,
                &format!("export '{name}' is being removed"),
            )
            .await?;
            return Ok(None);
        };
        self.reply(option, rep::ACK, &[]).await?;
        let base_allocation = self.meta_for(name);
        Ok(Some(Negotiated {
            attached,
            structured: self.structured,
            base_allocation,
        }))
    }

    async fn send_info(&mut self, option: u32, e: &Export, reqs: &[u16]) -> io::Result<()> {
        let mut v = Vec::with_capacity(12);
        v.extend_from_slice(&info::EXPORT.to_be_bytes());
        v.extend_from_slice(&e.bdev.size().to_be_bytes());
        v.extend_from_slice(&e.transmission_flags(self.structured).to_be_bytes());
        self.reply(option, rep::INFO, &v).await?;
        if reqs.contains(&info::NAME) {
            let mut v = info::NAME.to_be_bytes().to_vec();
            v.extend_from_slice(e.cfg.name.as_bytes());
            self.reply(option, rep::INFO, &v).await?;
        }
        if reqs.contains(&info::DESCRIPTION) && !e.cfg.description.is_empty() {
            let mut v = info::DESCRIPTION.to_be_bytes().to_vec();
            v.extend_from_slice(proto::truncate_utf8(&e.cfg.description, MAX_STRING).as_bytes());
            self.reply(option, rep::INFO, &v).await?;
        }
        // Block sizes are always sent: clients that did not ask may ignore them.
        let (min, pref, max) = e.block_sizes();
        let mut v = info::BLOCK_SIZE.to_be_bytes().to_vec();
        v.extend_from_slice(&min.to_be_bytes());
        v.extend_from_slice(&pref.to_be_bytes());
        v.extend_from_slice(&max.to_be_bytes());
        self.reply(option, rep::INFO, &v).await
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        if !self.structured {
            return self
                .error(
                    option,
                    rep::ERR_INVALID,
                    "structured replies must be negotiated first",
                )
                .await;
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.lstring()?;
            let n = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.lstring()?);
            }
            c.at_end().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self
                .error(option, rep::ERR_INVALID, "malformed meta context data")
                .await;
        };
        if self.inst.find(name).is_none() {
            return self
                .error(
                    option,
                    rep::ERR_UNKNOWN,
                    &format!("export '{name}' not present"),
                )
                .await;
        }
        let list = option == opt::LIST_META_CONTEXT;
        let selected = if list && queries.is_empty() {
            true
        } else {
            queries
                .iter()
                .any(|q| *q == BASE_ALLOCATION || (list && *q == "base:"))
        };
        if selected {
            let id = if list { 0 } else { BASE_ALLOCATION_ID };
            let mut v = id.to_be_bytes().to_vec();
            v.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &v).await?;
        }
        if !list {
            self.meta = Some((name.to_string(), selected));
        }
        self.reply(option, rep::ACK, &[]).await
    }
}

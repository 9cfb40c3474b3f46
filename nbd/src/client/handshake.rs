//! The client's side of the fixed newstyle handshake: `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT base:allocation`, then `NBD_OPT_GO` asking for
//! `NBD_INFO_BLOCK_SIZE`; as QEMU does, a server without structured replies
//! is used with simple ones (and no block status), and one without
//! `NBD_OPT_GO` with `NBD_OPT_EXPORT_NAME`.
//!
//! Every length the server sends is bounded before anything is read or
//! allocated after it; any violation of the protocol is an error (the caller
//! drops the connection), never a panic.

use crate::net::AsyncSock;
use crate::proto::{self, be16, be32, be64, info, opt, rep, tflags};

/// Largest option reply payload accepted (an error message, an info block).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest payload a request may carry, whatever the server says.
pub const MAX_PAYLOAD_CAP: u32 = 32 << 20;

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (requests are aligned to it).
    pub min_block: u32,
    /// Largest read or write payload.
    pub max_payload: u32,
    /// Structured replies negotiated.
    pub structured: bool,
    /// The context id of `base:allocation`, when negotiated.
    pub meta_id: Option<u32>,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket failed.
    Io(std::io::Error),
    /// The server broke the protocol (garbage, bad lengths).
    Protocol(String),
    /// The server refused (no such export, policy); the message is QEMU's
    /// first line and the server's own words.
    Refused(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "{e}"),
            HandshakeError::Protocol(m) => write!(f, "NBD protocol error: {m}"),
            HandshakeError::Refused(m) => f.write_str(m),
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::Protocol("the server closed the connection during the handshake".into())
        } else {
            HandshakeError::Io(e)
        }
    }
}

fn garbage(what: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(what.into())
}

/// One option reply's header.
struct Reply {
    ty: u32,
    len: u32,
}

async fn send_option(s: &mut AsyncSock, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).await?;
    Ok(())
}

async fn read_reply(s: &mut AsyncSock, option: u32) -> Result<(Reply, Vec<u8>), HandshakeError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await?;
    if be64(&h[0..8]) != proto::REP_MAGIC {
        return Err(garbage("bad option reply magic"));
    }
    if be32(&h[8..12]) != option {
        return Err(garbage(format!(
            "reply to option {} where {option} was sent",
            be32(&h[8..12])
        )));
    }
    let r = Reply {
        ty: be32(&h[12..16]),
        len: be32(&h[16..20]),
    };
    if r.len > MAX_OPTION_REPLY {
        return Err(garbage(format!("option reply of {} bytes", r.len)));
    }
    let mut data = vec![0u8; r.len as usize];
    s.read_exact(&mut data).await?;
    Ok((r, data))
}

/// The server's words in an error reply, for messages.
fn server_says(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake: QEMU's nbd_receive_starttls.
/// A server that refuses ends the connection: no fallback to plain text.
async fn starttls(
    s: &mut AsyncSock,
    session: rustls::Connection,
    hostname: Option<&str>,
) -> Result<(), HandshakeError> {
    send_option(s, opt::STARTTLS, &[]).await?;
    let (r, data) = read_reply(s, opt::STARTTLS).await?;
    match r.ty {
        rep::ACK => {}
        rep::ERR_UNSUP => {
            return Err(HandshakeError::Refused(
                "Server don't support STARTTLS option".into(),
            ))
        }
        rep::ERR_POLICY => {
            tracing::warn!(server_says = %server_says(&data), "NBD server refused STARTTLS");
            return Err(HandshakeError::Refused(
                "Denied by server for option 5 (starttls)".into(),
            ));
        }
        t if t & 0x8000_0000 != 0 => {
            return Err(HandshakeError::Refused(format!(
                "Server rejected request to start TLS {t:x}: server reported: {}",
                server_says(&data)
            )))
        }
        t => return Err(garbage(format!("reply type {t} to NBD_OPT_STARTTLS"))),
    }
    crate::tls::stream::handshake(s, session)
        .await
        .map_err(|e| HandshakeError::Refused(tls_words(&e, hostname)))
}

/// A TLS failure in the words QEMU (GnuTLS) uses where they differ.
fn tls_words(e: &std::io::Error, hostname: Option<&str>) -> String {
    let m = e.to_string();
    if m.contains("UnknownIssuer") || m.contains("BadSignature") {
        "The certificate hasn't got a known issuer".into()
    } else if m.contains("NotValidForName") {
        format!(
            "Certificate does not match the hostname {}",
            hostname.unwrap_or("")
        )
    } else if m.contains("Expired") {
        "The certificate has expired".into()
    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the server closed the connection during the TLS handshake".into()
    } else {
        format!("TLS handshake failed: {m}")
    }
}

/// Negotiates the export `export` on a freshly connected socket, over TLS
/// when `tls` is given.
pub async fn negotiate(
    s: &mut AsyncSock,
    export: &str,
    tls: Option<(rustls::Connection, Option<String>)>,
) -> Result<ExportInfo, HandshakeError> {
    let mut h = [0u8; 18];
    s.read_exact(&mut h).await?;
    if be64(&h[0..8]) != proto::NBDMAGIC {
        return Err(garbage("not an NBD server (bad magic)"));
    }
    if be64(&h[8..16]) != proto::IHAVEOPT {
        return Err(garbage(
            "the server does not speak the newstyle handshake (oldstyle servers are not supported)",
        ));
    }
    let sflags = be16(&h[16..18]);
    if sflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(garbage("the server does not support fixed newstyle"));
    }
    let no_zeroes = sflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;
    if let Some((session, hostname)) = tls {
        starttls(s, session, hostname.as_deref()).await?;
    }

    // Structured replies.
    send_option(s, opt::STRUCTURED_REPLY, &[]).await?;
    let (r, _) = read_reply(s, opt::STRUCTURED_REPLY).await?;
    let structured = match r.ty {
        rep::ACK => true,
        t if t & 0x8000_0000 != 0 => false,
        t => {
            return Err(garbage(format!(
                "reply type {t} to NBD_OPT_STRUCTURED_REPLY"
            )))
        }
    };

    // base:allocation.
    let mut meta_id = None;
    if structured {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(proto::BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        send_option(s, opt::SET_META_CONTEXT, &d).await?;
        for _ in 0..64 {
            let (r, data) = read_reply(s, opt::SET_META_CONTEXT).await?;
            match r.ty {
                rep::META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(garbage("short NBD_REP_META_CONTEXT"));
                    }
                    let name = &data[4..];
                    if name != proto::BASE_ALLOCATION.as_bytes() || meta_id.is_some() {
                        return Err(garbage(format!(
                            "unexpected meta context {:?}",
                            String::from_utf8_lossy(name)
                        )));
                    }
                    meta_id = Some(be32(&data[0..4]));
                }
                rep::ACK => break,
                t if t & 0x8000_0000 != 0 => {
                    meta_id = None;
                    break;
                }
                t => {
                    return Err(garbage(format!(
                        "reply type {t} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    // NBD_OPT_GO with NBD_INFO_BLOCK_SIZE.
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(s, opt::GO, &d).await?;
    let mut size_flags: Option<(u64, u16)> = None;
    let mut blocks: Option<(u32, u32, u32)> = None;
    for _ in 0..64 {
        let (r, data) = read_reply(s, opt::GO).await?;
        match r.ty {
            rep::INFO => {
                if data.len() < 2 {
                    return Err(garbage("short NBD_REP_INFO"));
                }
                match be16(&data[0..2]) {
                    info::EXPORT => {
                        if data.len() != 12 {
                            return Err(garbage("NBD_INFO_EXPORT of the wrong length"));
                        }
                        size_flags = Some((be64(&data[2..10]), be16(&data[10..12])));
                    }
                    info::BLOCK_SIZE => {
                        if data.len() != 14 {
                            return Err(garbage("NBD_INFO_BLOCK_SIZE of the wrong length"));
                        }
                        blocks = Some((be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])));
                    }
                    _ => {}
                }
            }
            rep::ACK => {
                let (size, flags) = size_flags
                    .ok_or_else(|| garbage("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
                return finish(size, flags, blocks, structured, meta_id);
            }
            rep::ERR_UNSUP => return export_name(s, export, no_zeroes, structured, meta_id).await,
            rep::ERR_TLS_REQD => {
                tracing::warn!(export, server_says = %server_says(&data), "NBD server requires TLS");
                return Err(HandshakeError::Refused(
                    "TLS negotiation required before option 7 (go)".into(),
                ));
            }
            rep::ERR_UNKNOWN => {
                tracing::warn!(export, server_says = %server_says(&data), "NBD export not available");
                return Err(HandshakeError::Refused(
                    "Requested export not available".into(),
                ));
            }
            t if t & 0x8000_0000 != 0 => {
                return Err(HandshakeError::Refused(format!(
                    "Server rejected NBD_OPT_GO (error {t:#x}): server reported: {}",
                    server_says(&data)
                )))
            }
            t => return Err(garbage(format!("reply type {t} to NBD_OPT_GO"))),
        }
    }
    Err(garbage("too many replies to NBD_OPT_GO"))
}

/// The old way into transmission, for servers without `NBD_OPT_GO`.
async fn export_name(
    s: &mut AsyncSock,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    meta_id: Option<u32>,
) -> Result<ExportInfo, HandshakeError> {
    send_option(s, opt::EXPORT_NAME, export.as_bytes()).await?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::Refused("Requested export not available".into())
        } else {
            HandshakeError::Io(e)
        }
    })?;
    if !no_zeroes {
        s.skip(124).await?;
    }
    finish(be64(&b[0..8]), be16(&b[8..10]), None, structured, meta_id)
}

fn finish(
    size: u64,
    flags: u16,
    blocks: Option<(u32, u32, u32)>,
    structured: bool,
    meta_id: Option<u32>,
) -> Result<ExportInfo, HandshakeError> {
    if flags & tflags::HAS_FLAGS == 0 {
        return Err(garbage("transmission flags without NBD_FLAG_HAS_FLAGS"));
    }
    if size > i64::MAX as u64 {
        return Err(garbage(format!("export size {size} too large")));
    }
    let (min_block, max_payload) = match blocks {
        None => (1, MAX_PAYLOAD_CAP),
        Some((min, pref, max)) => {
            if !min.is_power_of_two() || min > 64 << 10 {
                return Err(garbage(format!("minimum block size {min}")));
            }
            if !pref.is_power_of_two() || pref < min.max(512) {
                return Err(garbage(format!("preferred block size {pref}")));
            }
            if max < pref || (max != u32::MAX && !max.is_multiple_of(min)) {
                return Err(garbage(format!("maximum block size {max}")));
            }
            (min, max.min(MAX_PAYLOAD_CAP))
        }
    };
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        max_payload,
        structured,
        meta_id: if structured { meta_id } else { None },
    })
}

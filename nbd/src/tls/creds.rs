//! QEMU's `tls-creds-x509` object: x509 credentials loaded from a directory
//! in QEMU's layout (crypto/tlscredsx509.c), ready to start server or client
//! sessions. Loading checks everything it can (files present and readable,
//! certificates and keys parseable, the key matching the certificate), so a
//! bad directory is refused when the object is made, not at the first client.

use super::verify::{AnyServer, ChainOnly};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which side of a session the credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A server (`endpoint: server`).
    Server,
    /// A client (`endpoint: client`, the object's default).
    Client,
}

impl Endpoint {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }
}

enum Side {
    Server(Arc<ServerConfig>),
    Client {
        /// Verifies the chain and the server's name.
        named: Arc<ClientConfig>,
        /// Verifies the chain only (no host name to check: a Unix socket
        /// without `tls-hostname`, as QEMU does).
        chain_only: Arc<ClientConfig>,
    },
}

/// Loaded x509 credentials (`object-add qom-type=tls-creds-x509`).
pub struct TlsCreds {
    /// The object's id.
    pub id: String,
    /// The directory.
    pub dir: PathBuf,
    /// Server or client.
    pub endpoint: Endpoint,
    /// Whether the peer's certificate is verified (and, on a server, required).
    pub verify_peer: bool,
    side: Side,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

/// A file of the directory: its path, or QEMU's error when it cannot be read.
fn path(dir: &Path, name: &str, required: bool) -> Result<Option<PathBuf>, String> {
    let p = dir.join(name);
    match std::fs::metadata(&p) {
        Ok(_) => Ok(Some(p)),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {}: {}",
            p.display(),
            strerror(&e)
        )),
    }
}

/// The OS error's text alone, as `strerror` gives it.
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn certs(p: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let v: Vec<_> = CertificateDer::pem_file_iter(p)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("Unable to import {what} {}: {e}", p.display()))?;
    if v.is_empty() {
        return Err(format!(
            "Unable to import {what} {}: no certificate in the file",
            p.display()
        ));
    }
    Ok(v)
}

fn key(p: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(p)
        .map_err(|e| format!("Unable to import private key {}: {e}", p.display()))
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, String> {
    let ca = path(dir, "ca-cert.pem", true)?.unwrap_or_default();
    let mut store = RootCertStore::empty();
    for c in certs(&ca, "CA certificate list")? {
        store
            .add(c)
            .map_err(|e| format!("Unable to import CA certificate list {}: {e}", ca.display()))?;
    }
    Ok(Arc::new(store))
}

impl TlsCreds {
    /// Loads the credentials of `dir` for `endpoint`.
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<TlsCreds, String> {
        let provider = super::provider();
        let side = match endpoint {
            Endpoint::Server => {
                // QEMU needs the CA on a server too (it verifies clients with it).
                let roots = roots(dir)?;
                let cert = path(dir, "server-cert.pem", true)?.unwrap_or_default();
                let keyf = path(dir, "server-key.pem", true)?.unwrap_or_default();
                let chain = certs(&cert, "server certificate")?;
                let key = key(&keyf)?;
                let b = ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?;
                let b = if verify_peer {
                    let v = WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| format!("Unable to set up client verification: {e}"))?;
                    b.with_client_cert_verifier(v)
                } else {
                    b.with_no_client_auth()
                };
                let cfg = b.with_single_cert(chain, key).map_err(|e| {
                    format!(
                        "Unable to load certificate {} and key {}: {e}",
                        cert.display(),
                        keyf.display()
                    )
                })?;
                Side::Server(Arc::new(cfg))
            }
            Endpoint::Client => {
                let roots = roots(dir)?;
                let cert = path(dir, "client-cert.pem", false)?;
                let keyf = path(dir, "client-key.pem", false)?;
                let ident = match (cert, keyf) {
                    (Some(c), Some(k)) => Some((certs(&c, "client certificate")?, key(&k)?, c, k)),
                    _ => None,
                };
                let named = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("Unable to set up server verification: {e}"))?;
                let make = |v: Arc<dyn rustls::client::danger::ServerCertVerifier>| {
                    let b = ClientConfig::builder_with_provider(provider.clone())
                        .with_safe_default_protocol_versions()
                        .map_err(|e| e.to_string())?
                        .dangerous()
                        .with_custom_certificate_verifier(v);
                    match &ident {
                        Some((chain, key, c, k)) => b
                            .with_client_auth_cert(chain.clone(), key.clone_key())
                            .map_err(|e| {
                                format!(
                                    "Unable to load certificate {} and key {}: {e}",
                                    c.display(),
                                    k.display()
                                )
                            }),
                        None => Ok(b.with_no_client_auth()),
                    }
                    .map(Arc::new)
                };
                if verify_peer {
                    Side::Client {
                        named: make(named.clone())?,
                        chain_only: make(Arc::new(ChainOnly(named)))?,
                    }
                } else {
                    let any = make(Arc::new(AnyServer(provider.clone())))?;
                    Side::Client {
                        named: any.clone(),
                        chain_only: any,
                    }
                }
            }
        };
        Ok(TlsCreds {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            endpoint,
            verify_peer,
            side,
        })
    }

    /// A server session, or QEMU's error when these are client credentials.
    pub fn server_session(&self) -> Result<rustls::Connection, String> {
        match &self.side {
            Side::Server(cfg) => rustls::ServerConnection::new(cfg.clone())
                .map(rustls::Connection::Server)
                .map_err(|e| e.to_string()),
            Side::Client { .. } => Err(self.wrong_endpoint(Endpoint::Server)),
        }
    }

    /// A client session checking the server's certificate against `hostname`
    /// (the chain alone when `None`), or QEMU's error when these are server
    /// credentials.
    pub fn client_session(&self, hostname: Option<&str>) -> Result<rustls::Connection, String> {
        let Side::Client { named, chain_only } = &self.side else {
            return Err(self.wrong_endpoint(Endpoint::Client));
        };
        let (cfg, name) = match hostname {
            Some(h) => (
                named.clone(),
                ServerName::try_from(h.to_string())
                    .map_err(|_| format!("invalid TLS host name '{h}'"))?,
            ),
            None => (
                chain_only.clone(),
                ServerName::try_from("localhost").map_err(|e| e.to_string())?,
            ),
        };
        rustls::ClientConnection::new(cfg, name)
            .map(rustls::Connection::Client)
            .map_err(|e| e.to_string())
    }

    /// QEMU's refusal of credentials made for the other side.
    pub fn wrong_endpoint(&self, want: Endpoint) -> String {
        match want {
            Endpoint::Server => "Expected TLS credentials for a server endpoint".into(),
            Endpoint::Client => "Expected TLS credentials for a client endpoint".into(),
        }
    }
}

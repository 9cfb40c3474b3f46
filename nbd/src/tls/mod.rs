//! TLS for NBD, as QEMU speaks it: `NBD_OPT_STARTTLS` in the option haggle,
//! then a TLS session over the same socket, driven by the reactors.
//!
//! The contract:
//!
//! - Credentials are QEMU's `tls-creds-x509` objects ([`creds::TlsCreds`]): a
//!   directory in QEMU's layout (`ca-cert.pem`, `server-cert.pem`,
//!   `server-key.pem`, `client-cert.pem`, `client-key.pem`; `ca-crl.pem` and
//!   `dh-params.pem` are not used), an endpoint (server or client) and
//!   `verify-peer`. They are loaded, and checked, when the object is made; the
//!   object is shared (an `Arc`) by what uses it, so "in use" is a reference count.
//! - Access control is QEMU's `authz-simple` ([`authz::AuthzSimple`]): the
//!   client certificate's distinguished name, formatted as GnuTLS formats it
//!   (RFC 4514), must equal the object's `identity`.
//! - The session ([`stream::TlsSock`]) sits inside [`crate::net::Sock`], so the
//!   handshakes and the transmission phases of the server and the client run on
//!   it unchanged. It never blocks: a read drains the plaintext rustls holds
//!   before it reads the socket, and comes back short only when the socket
//!   would block (so a short read still means "wait for the next edge"); a
//!   write reports plaintext as written only once its ciphertext is on the
//!   socket (so a writer that re-sends what was not reported, as every writer
//!   here does, never leaves ciphertext stranded in rustls).
//! - A server with credentials refuses every option but `STARTTLS` and `ABORT`
//!   before TLS (`NBD_REP_ERR_TLS_REQD`); a client with credentials sends
//!   `STARTTLS` first and never falls back to plain text.
//! - rustls with the `ring` provider: TLS 1.3 and 1.2.

pub mod authz;
pub mod creds;
pub mod stream;
mod verify;

pub use authz::AuthzSimple;
pub use creds::{Endpoint, TlsCreds};
pub use stream::TlsSock;

/// The crypto provider every configuration uses.
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

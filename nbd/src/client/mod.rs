//! The NBD client: a block device on a remote (or local) NBD server, as
//! QEMU's `nbd` block driver (block/nbd.c) opens one, on the reactors.
//!
//! - [`config`]: where to connect and the reconnection policy; QEMU's
//!   options, URIs and the filename QEMU gives such a node.
//! - [`handshake`]: fixed newstyle, structured replies, `base:allocation`,
//!   `NBD_OPT_GO` with block sizes, QEMU's fallbacks; every length bounded.
//! - `connect`: non-blocking connects (a reactor never blocks on a socket).
//! - `conn`: one connection per reactor, many requests in flight, simple and
//!   structured replies, reconnection within `reconnect-delay`; a server that
//!   answers garbage has its connection dropped.
//! - [`bdev`]: [`NbdBdev`], the bdev contract over those connections.
//!
//! The transport is a plain stream socket ([`crate::net::Sock`]); TLS would
//! wrap it below the handshake and the connection without changing either.

pub mod bdev;
pub mod config;
mod conn;
mod connect;
mod gate;
pub mod handshake;
#[cfg(test)]
mod priority_tests;
mod split;
#[cfg(test)]
mod tests;

pub use self::bdev::NbdBdev;
pub use config::{ClientConfig, ServerAddr, DEFAULT_PORT};
pub use handshake::ExportInfo;
pub use split::piece_from_env;

/// Lets qcow2 headers name backing files on NBD servers, as QEMU writes them
/// (`nbd://`, `nbd+tcp://`, `nbd+unix://` URIs and `json:` names with driver
/// `nbd`): such a backing opens read-only through [`NbdBdev`].
pub fn register_backing_protocol() {
    ::bdev::qcow2::register_protocol(
        "nbd",
        &["nbd", "nbd+tcp", "nbd+unix"],
        &["server", "export", "reconnect-delay", "open-timeout"],
        open_backing,
    );
}

fn open_backing(
    name: String,
    spec: serde_json::Value,
) -> futures::future::LocalBoxFuture<
    'static,
    Result<std::sync::Arc<dyn ::bdev::Bdev>, ::bdev::BdevError>,
> {
    Box::pin(async move {
        let cfg = match &spec {
            serde_json::Value::String(u) => ClientConfig::parse_uri(u),
            serde_json::Value::Object(m) => ClientConfig::from_options(m),
            other => Err(format!("an NBD backing named by {other}")),
        }
        .map_err(|e| ::bdev::BdevError::InvalidParam(format!("backing file: {e}")))?;
        let b = NbdBdev::open(&name, cfg, true).await?;
        Ok(b as std::sync::Arc<dyn ::bdev::Bdev>)
    })
}

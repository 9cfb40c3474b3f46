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
pub mod handshake;
#[cfg(test)]
mod tests;

pub use self::bdev::NbdBdev;
pub use config::{ClientConfig, ServerAddr, DEFAULT_PORT};
pub use handshake::ExportInfo;

//! The NBD export: a server speaking the NBD protocol (fixed newstyle handshake,
//! structured replies, `base:allocation`) over Unix and TCP sockets, served on
//! the reactors without a thread per connection.
//!
//! - [`server::NbdServer`] owns the listeners and the exports. It holds no
//!   process-wide state: the daemon's lives in its service context (driven by
//!   `nbd-server-start`, `block-export-add`, ...), so two servers can live in
//!   one process.
//! - Listeners accept on the main reactor; each connection is a local task on
//!   one reactor (round-robin), parked on its socket's readiness ([`net`]).
//! - An export holds its bdev (a device keeps its identity across snapshot and
//!   stream switches), claims it in the graph's registry, and counts its connections.

pub mod addr;
pub mod client;
mod conn;
pub mod error;
pub mod export;
mod handshake;
pub mod net;
mod pool;
pub mod proto;
pub mod server;
mod status;
#[cfg(test)]
mod tests;
pub mod tls;

pub use addr::ListenAddr;
pub use error::NbdError;
pub use export::ExportConfig;
pub use server::{ExportInfo, NbdServer, StartOptions};

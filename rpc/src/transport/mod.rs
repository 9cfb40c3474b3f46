//! What both RPC dialects share: listening sockets, the threaded server with
//! its caps, and the splitting of a byte stream into JSON requests.

pub mod call;
pub mod framing;
pub mod grammar;
pub mod server;
pub mod socket;

use std::path::PathBuf;
use thiserror::Error;

pub use framing::{Frame, Splitter};
pub use server::{Limits, Protocol, Server};
pub use socket::{bind_tcp, bind_unix, Conn, Listener};

/// Why a server could not start.
#[derive(Debug, Error)]
pub enum TransportError {
    /// An OS error while setting up the socket.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path (or address).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another server owns the socket path.
    #[error("{} is in use: {why}", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// How we know.
        why: String,
    },
    /// A bad or refused TCP address.
    #[error("cannot listen on {addr}: {why}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// Why not.
        why: String,
    },
}

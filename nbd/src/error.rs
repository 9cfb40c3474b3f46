//! Errors of the NBD server's control path (starting, exporting, stopping).

use thiserror::Error;

/// Why an NBD control operation failed.
#[derive(Debug, Error)]
pub enum NbdError {
    /// `nbd-server-start` while a server runs.
    #[error("NBD server already running")]
    AlreadyRunning,
    /// An export operation without a running server.
    #[error("NBD server not running")]
    NotRunning,
    /// A listen address could not be parsed or is not allowed.
    #[error("invalid NBD listen address {addr:?}: {why}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        why: String,
    },
    /// Binding or listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An export id is taken.
    #[error("Block export id '{0}' is already in use")]
    IdInUse(String),
    /// An export name is taken.
    #[error("NBD server already has export named '{0}'")]
    NameInUse(String),
    /// No export with that id.
    #[error("Export '{0}' is not found")]
    NoSuchExport(String),
    /// `block-export-del` in safe mode while clients are connected.
    #[error("export '{0}' still in use (use mode='hard' to force client disconnect)")]
    InUse(String),
    /// An invalid parameter; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// A writable export of a read-only node.
    #[error("Cannot export read-only node '{0}' as writable")]
    ReadOnlyNode(String),
    /// The bdev layer refused (unknown node, claim).
    #[error(transparent)]
    Bdev(#[from] bdev::BdevError),
    /// The reactors refused the work (shutting down).
    #[error("runtime: {0}")]
    Runtime(String),
}

impl From<reactor::ReactorError> for NbdError {
    fn from(e: reactor::ReactorError) -> Self {
        NbdError::Runtime(e.to_string())
    }
}

impl From<reactor::JoinError> for NbdError {
    fn from(e: reactor::JoinError) -> Self {
        NbdError::Runtime(e.to_string())
    }
}

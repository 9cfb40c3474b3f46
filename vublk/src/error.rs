//! The vhost-user-blk export's errors (mapped to JSON-RPC codes and QMP
//! classes in `rpc/src/error.rs`).

use thiserror::Error;

/// What can go wrong adding, removing or finding a vhost-user-blk export.
#[derive(Debug, Error)]
pub enum VublkError {
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// An export with this id exists.
    #[error("Block export id '{0}' is already in use")]
    IdInUse(String),
    /// No export with this id.
    #[error("Export '{0}' is not found")]
    NoSuchExport(String),
    /// A front end is connected (a safe delete).
    #[error("export '{0}' still in use")]
    InUse(String),
    /// A writable export of a read-only node.
    #[error("Cannot export read-only node '{0}' as writable")]
    ReadOnlyNode(String),
    /// The socket could not be set up.
    #[error("Failed to listen on '{path}': {err}")]
    Listen {
        /// The socket's path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The node could not be found or claimed.
    #[error(transparent)]
    Bdev(#[from] bdev::BdevError),
}

//! The RBD driver's errors (control path; data-path failures are
//! [`bdev::IoStatus`]). `rpc/src/error.rs` maps them to JSON-RPC codes and
//! QMP classes.

use thiserror::Error;

/// What connecting, opening or managing clusters can fail with.
#[derive(Debug, Error)]
pub enum RbdError {
    /// sluice was built on a machine without librbd / librados.
    #[error("sluice was built without librbd (install librbd-dev and librados-dev and rebuild)")]
    Unavailable,
    /// A librados or librbd call failed: what was done, and its errno (positive).
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Ceph { what: String, errno: i32 },
    /// No registered cluster of that name.
    #[error("cluster {0:?} is not registered")]
    NoCluster(String),
    /// A cluster of that name is registered already.
    #[error("cluster {0:?} is already registered")]
    ClusterExists(String),
    /// The cluster is still used by bdevs.
    #[error("cluster {name:?} is still used by {users} rbd bdev(s)")]
    ClusterBusy { name: String, users: usize },
    /// A parameter is wrong; the message names it.
    #[error("{0}")]
    Invalid(String),
}

impl RbdError {
    /// A failed call (`ret`: librados' negative errno).
    pub fn ceph(what: impl Into<String>, ret: i32) -> Self {
        RbdError::Ceph {
            what: what.into(),
            errno: ret.abs(),
        }
    }

    /// The positive errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            RbdError::Unavailable => libc::ENOTSUP,
            RbdError::Ceph { errno, .. } => *errno,
            RbdError::NoCluster(_) => libc::ENOENT,
            RbdError::ClusterExists(_) => libc::EEXIST,
            RbdError::ClusterBusy { .. } => libc::EBUSY,
            RbdError::Invalid(_) => libc::EINVAL,
        }
    }
}

impl From<RbdError> for bdev::BdevError {
    fn from(e: RbdError) -> Self {
        match e {
            RbdError::Invalid(m) => bdev::BdevError::InvalidParam(m),
            RbdError::Unavailable => bdev::BdevError::Unsupported(e.to_string()),
            RbdError::Ceph { what, errno } => {
                bdev::BdevError::os(what, std::io::Error::from_raw_os_error(errno))
            }
            other => bdev::BdevError::InvalidParam(other.to_string()),
        }
    }
}

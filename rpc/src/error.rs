//! RPC errors, and the one place where every crate's errors become JSON-RPC
//! codes and QMP error classes.

use serde_json::{json, Value};
use thiserror::Error;

/// QMP error classes (QEMU 10's, plus the 2011 streaming API's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything QEMU reports without a specific class.
    GenericError,
    /// Unknown command (or not yet negotiated).
    CommandNotFound,
    /// A device or node that does not exist.
    DeviceNotFound,
    /// No job/stream on the device.
    DeviceNotActive,
    /// The device is busy (2011 API).
    DeviceInUse,
    /// The operation is not supported (2011 API).
    NotSupported,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceInUse => "DeviceInUse",
            ErrorClass::NotSupported => "NotSupported",
        }
    }
}

/// JSON-RPC 2.0 error codes.
pub mod codes {
    /// Invalid JSON.
    pub const PARSE_ERROR: i32 = -32700;
    /// Not a valid request object.
    pub const INVALID_REQUEST: i32 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// Wrong parameters.
    pub const INVALID_PARAMS: i32 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i32 = -32603;
}

/// An error answered to an RPC client: a JSON-RPC code and a QMP class.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("{message}")]
pub struct RpcError {
    /// JSON-RPC code (SPDK's: -326xx or a negative errno).
    pub code: i32,
    /// QMP class.
    pub class: ErrorClass,
    /// Human-readable message.
    pub message: String,
}

impl RpcError {
    /// A new error.
    pub fn new(code: i32, class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            code,
            class,
            message: message.into(),
        }
    }
    /// -32602 invalid params.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(codes::INVALID_PARAMS, ErrorClass::GenericError, message)
    }
    /// -32601 / CommandNotFound.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            codes::METHOD_NOT_FOUND,
            ErrorClass::CommandNotFound,
            format!("The command {method} has not been found"),
        )
    }
    /// -32603 internal error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL_ERROR, ErrorClass::GenericError, message)
    }
    /// A negative-errno error (SPDK style) with a generic class.
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        Self::new(-errno.abs(), ErrorClass::GenericError, message)
    }
    /// With another QMP class.
    pub fn with_class(mut self, class: ErrorClass) -> Self {
        self.class = class;
        self
    }
    /// JSON-RPC `error` member.
    pub fn to_jsonrpc(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }
    /// QMP `error` member.
    pub fn to_qmp(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.message})
    }
}

impl From<bdev::BdevError> for RpcError {
    fn from(e: bdev::BdevError) -> Self {
        use bdev::BdevError as B;
        let class = match &e {
            B::NotFound(_) => ErrorClass::DeviceNotFound,
            _ => ErrorClass::GenericError,
        };
        let code = match &e {
            B::InvalidParam(_) => codes::INVALID_PARAMS,
            _ => -e.errno(),
        };
        RpcError::new(code, class, e.to_string())
    }
}

impl From<rbd::RbdError> for RpcError {
    fn from(e: rbd::RbdError) -> Self {
        use rbd::RbdError as R;
        let code = match &e {
            R::Invalid(_) => codes::INVALID_PARAMS,
            _ => -e.errno(),
        };
        RpcError::new(code, ErrorClass::GenericError, e.to_string())
    }
}

impl From<reactor::ReactorError> for RpcError {
    fn from(e: reactor::ReactorError) -> Self {
        RpcError::errno(libc::ESHUTDOWN, e.to_string())
    }
}

impl From<reactor::JoinError> for RpcError {
    fn from(e: reactor::JoinError) -> Self {
        RpcError::errno(libc::ESHUTDOWN, e.to_string())
    }
}

impl From<crate::config::ConfigError> for RpcError {
    fn from(e: crate::config::ConfigError) -> Self {
        use crate::config::ConfigError as C;
        match e {
            C::Method { error, .. } => error,
            C::Io { ref source, .. } => {
                RpcError::errno(source.raw_os_error().unwrap_or(libc::EIO), e.to_string())
            }
            C::Json { .. } | C::Format(_) | C::NotRegular { .. } => {
                RpcError::invalid_params(e.to_string())
            }
        }
    }
}

impl From<nbd::NbdError> for RpcError {
    fn from(e: nbd::NbdError) -> Self {
        use nbd::NbdError as N;
        match e {
            N::Bdev(b) => {
                let msg = b.to_string();
                let mut r = RpcError::from(b);
                r.message = msg;
                r
            }
            N::Invalid(_) | N::BadAddress { .. } => RpcError::invalid_params(e.to_string()),
            N::NoSuchExport(_) => RpcError::errno(libc::ENOENT, e.to_string()),
            N::IdInUse(_) | N::NameInUse(_) => RpcError::errno(libc::EEXIST, e.to_string()),
            N::InUse(_) => RpcError::errno(libc::EBUSY, e.to_string()),
            N::AlreadyRunning => RpcError::errno(libc::EALREADY, e.to_string()),
            N::NotRunning => RpcError::errno(libc::ENOTCONN, e.to_string()),
            N::ReadOnlyNode(_) => RpcError::errno(libc::EROFS, e.to_string()),
            N::Listen { ref source, .. } => {
                RpcError::errno(source.raw_os_error().unwrap_or(libc::EIO), e.to_string())
            }
            N::Runtime(_) => RpcError::errno(libc::ESHUTDOWN, e.to_string()),
        }
    }
}

impl From<vublk::VublkError> for RpcError {
    fn from(e: vublk::VublkError) -> Self {
        use vublk::VublkError as V;
        match e {
            V::Bdev(b) => {
                let msg = b.to_string();
                let mut r = RpcError::from(b);
                r.message = msg;
                r
            }
            V::Invalid(_) => RpcError::invalid_params(e.to_string()),
            V::NoSuchExport(_) => RpcError::errno(libc::ENOENT, e.to_string()),
            V::IdInUse(_) => RpcError::errno(libc::EEXIST, e.to_string()),
            V::InUse(_) => RpcError::errno(libc::EBUSY, e.to_string()),
            V::ReadOnlyNode(_) => RpcError::errno(libc::EROFS, e.to_string()),
            V::Listen { ref err, .. } => RpcError::errno(
                err.raw_os_error().unwrap_or(libc::EADDRINUSE),
                e.to_string(),
            ),
        }
    }
}

impl From<perf::PerfError> for RpcError {
    fn from(e: perf::PerfError) -> Self {
        use perf::PerfError as P;
        match e {
            P::Args(m) => RpcError::invalid_params(m),
            P::Bdev(e) => e.into(),
            P::Reactor(e) => e.into(),
            e @ P::Job { .. } => RpcError::errno(libc::EIO, e.to_string()),
        }
    }
}

impl From<jobs::job::JobError> for RpcError {
    fn from(e: jobs::job::JobError) -> Self {
        use jobs::job::JobError as J;
        let (code, class) = match &e {
            J::InvalidId(_) => (codes::INVALID_PARAMS, ErrorClass::GenericError),
            J::IdInUse(_) => (-libc::EEXIST, ErrorClass::GenericError),
            J::NodeBusy { .. } => (-libc::EBUSY, ErrorClass::GenericError),
            J::BlockJobNotFound(_) => (-libc::ENODEV, ErrorClass::DeviceNotActive),
            J::JobNotFound => (-libc::ENODEV, ErrorClass::GenericError),
            J::Refused(_) => (-libc::EPERM, ErrorClass::GenericError),
        };
        RpcError::new(code, class, e.to_string())
    }
}

impl From<jobs::drivers::stream::StreamError> for RpcError {
    fn from(e: jobs::drivers::stream::StreamError) -> Self {
        use jobs::drivers::stream::StreamError as S;
        match e {
            S::Job(j) => j.into(),
            S::NotFound { .. } => {
                RpcError::new(-libc::ENODEV, ErrorClass::GenericError, e.to_string())
            }
            S::Invalid(_) => RpcError::new(
                codes::INVALID_PARAMS,
                ErrorClass::GenericError,
                e.to_string(),
            ),
            S::ReadOnly => RpcError::new(-libc::EROFS, ErrorClass::GenericError, e.to_string()),
        }
    }
}

impl From<jobs::drivers::commit::CommitError> for RpcError {
    fn from(e: jobs::drivers::commit::CommitError) -> Self {
        use jobs::drivers::commit::CommitError as C;
        match e {
            C::Job(j) => j.into(),
            C::DeviceNotFound(_) => {
                RpcError::new(-libc::ENODEV, ErrorClass::DeviceNotFound, e.to_string())
            }
            C::NotFound { .. } => {
                RpcError::new(-libc::ENODEV, ErrorClass::GenericError, e.to_string())
            }
            C::Invalid(_) => RpcError::new(
                codes::INVALID_PARAMS,
                ErrorClass::GenericError,
                e.to_string(),
            ),
            C::ReadOnly(_) => RpcError::new(-libc::EROFS, ErrorClass::GenericError, e.to_string()),
        }
    }
}

impl From<jobs::drivers::mirror::MirrorError> for RpcError {
    fn from(e: jobs::drivers::mirror::MirrorError) -> Self {
        use jobs::drivers::mirror::MirrorError as M;
        match e {
            M::Job(j) => j.into(),
            M::NotFound(_) | M::ReplacesNotFound(_) => {
                RpcError::new(-libc::ENODEV, ErrorClass::GenericError, e.to_string())
            }
            M::Invalid(_) => RpcError::new(
                codes::INVALID_PARAMS,
                ErrorClass::GenericError,
                e.to_string(),
            ),
        }
    }
}

impl From<jobs::drivers::stream2011::LegacyError> for RpcError {
    fn from(e: jobs::drivers::stream2011::LegacyError) -> Self {
        use jobs::drivers::stream2011::LegacyError as L;
        match e {
            L::DeviceNotFound(_) => {
                RpcError::new(-libc::ENODEV, ErrorClass::DeviceNotFound, e.to_string())
            }
            L::DeviceInUse(_) => {
                RpcError::new(-libc::EBUSY, ErrorClass::DeviceInUse, e.to_string())
            }
            L::NotSupported => {
                RpcError::new(-libc::ENOTSUP, ErrorClass::NotSupported, e.to_string())
            }
            L::DeviceNotActive(_) => {
                RpcError::new(-libc::ENODEV, ErrorClass::DeviceNotActive, e.to_string())
            }
            L::Stream(s) => s.into(),
        }
    }
}

impl From<graph::snapshot::SnapshotError> for RpcError {
    fn from(e: graph::snapshot::SnapshotError) -> Self {
        use graph::snapshot::SnapshotError as S;
        match e {
            S::DeviceNotFound(_) => {
                RpcError::new(-libc::ENODEV, ErrorClass::DeviceNotFound, e.to_string())
            }
            S::Invalid(_) => RpcError::new(
                codes::INVALID_PARAMS,
                ErrorClass::GenericError,
                e.to_string(),
            ),
            S::Bdev(b) => b.into(),
        }
    }
}

#[cfg(test)]
mod errno_tests {
    use super::RpcError;

    /// Crates report positive errnos; the JSON-RPC code is SPDK's negative one.
    #[test]
    fn bdev_and_nvme_errors_become_negative_codes() {
        let e = RpcError::from(bdev::BdevError::NotFound("x".into()));
        assert_eq!(e.code, -libc::ENODEV);
        let e = RpcError::from(bdev::BdevError::Io(bdev::IoStatus::Enospc));
        assert_eq!(e.code, -libc::ENOSPC);
        let e = RpcError::from(bdev::nvme::NvmeError::Exists("n".into()));
        assert_eq!(e.code, -libc::EEXIST);
        let e = RpcError::from(bdev::nvme::NvmeError::Bdev(bdev::BdevError::Exists(
            "n".into(),
        )));
        assert_eq!(e.code, -libc::EEXIST);
    }
}

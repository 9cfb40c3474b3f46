use thiserror::Error;

/// Errors of the bdev layer (control path; data-path failures are [`crate::IoStatus`]).
#[derive(Debug, Error)]
pub enum BdevError {
    /// No bdev of that name.
    #[error("no bdev named {0:?}")]
    NotFound(String),
    /// A bdev of that name exists already.
    #[error("a bdev named {0:?} already exists")]
    Exists(String),
    /// The bdev is in use by a layer above and cannot be deleted or claimed again.
    #[error("bdev {name:?} is in use by {by}")]
    Claimed { name: String, by: String },
    /// A claim conflicts with the permissions of one already held (QEMU's words).
    #[error("{0}")]
    PermissionConflict(String),
    /// A parameter is wrong; the message names it.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// An option refused in the words of the tool it comes from (QEMU's
    /// qcow2 cache options), shown as it is.
    #[error("{0}")]
    BadOption(String),
    /// The operation is not supported by this bdev.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Out of (DMA) memory.
    #[error("out of memory: {0}")]
    NoMem(String),
    /// An I/O failed with this status.
    #[error("I/O error: {0}")]
    Io(crate::IoStatus),
    /// The image or device contents are invalid.
    #[error("corrupt or invalid data: {0}")]
    Corrupt(String),
    /// An operating-system error, with what was being done.
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The reactor runtime refused the work.
    #[error("runtime: {0}")]
    Runtime(String),
    /// Another user of the file holds a conflicting image lock (see
    /// [`crate::lock`]): QEMU's message, then its hint.
    #[error("{message}. Is another process using the image [{}]?", path.display())]
    Locked {
        message: String,
        path: std::path::PathBuf,
    },
}

impl BdevError {
    /// Wraps an OS error with context.
    pub fn os(what: impl Into<String>, source: std::io::Error) -> Self {
        BdevError::Os {
            what: what.into(),
            source,
        }
    }

    /// The positive errno of this error, as [`crate::IoStatus::errno`] (the
    /// one sign of the workspace: SPDK's negative JSON-RPC codes are made in
    /// `rpc`'s error mapping).
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::NotFound(_) => libc::ENODEV,
            BdevError::Exists(_) => libc::EEXIST,
            BdevError::Claimed { .. } => libc::EBUSY,
            BdevError::PermissionConflict(_) => libc::EPERM,
            BdevError::InvalidParam(_) | BdevError::BadOption(_) => libc::EINVAL,
            BdevError::Unsupported(_) => libc::ENOTSUP,
            BdevError::NoMem(_) => libc::ENOMEM,
            BdevError::Io(s) => s.errno(),
            BdevError::Corrupt(_) => libc::EINVAL,
            BdevError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            BdevError::Runtime(_) => libc::ESHUTDOWN,
            BdevError::Locked { .. } => libc::EAGAIN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BdevError;
    use crate::IoStatus;

    /// One errno sign: a bdev error carrying an I/O status names the same
    /// (positive) errno as the status, and every other error is positive too.
    #[test]
    fn errno_is_positive_and_agrees_with_io_status() {
        for st in [
            IoStatus::Eio,
            IoStatus::Enospc,
            IoStatus::Einval,
            IoStatus::Unsupported,
            IoStatus::Nomem,
            IoStatus::Aborted,
            IoStatus::ReadOnly,
        ] {
            assert_eq!(BdevError::Io(st).errno(), st.errno(), "{st:?}");
            assert!(st.errno() > 0, "{st:?}");
            assert_eq!(IoStatus::from_errno(BdevError::Io(st).errno()), st);
        }
        let os = BdevError::os("open", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(os.errno(), libc::ENOENT);
        assert_eq!(BdevError::NotFound("x".into()).errno(), libc::ENODEV);
        assert_eq!(
            BdevError::Claimed {
                name: "x".into(),
                by: "y".into()
            }
            .errno(),
            libc::EBUSY
        );
        assert_eq!(BdevError::Runtime("x".into()).errno(), libc::ESHUTDOWN);
    }
}

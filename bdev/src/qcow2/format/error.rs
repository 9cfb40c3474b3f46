//! Errors of the format layer.

use crate::error::BdevError;
use thiserror::Error;

/// Why an image cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The bytes are not a qcow2 header.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// A qcow2 version other than 2 or 3.
    #[error("unsupported qcow2 version {0} (only 2 and 3 are supported)")]
    BadVersion(u32),
    /// Incompatible features this implementation does not know or support.
    #[error("unsupported incompatible qcow2 features: {0}")]
    IncompatibleFeatures(String),
    /// A field of the header is out of range or inconsistent.
    #[error("invalid qcow2 header: {0}")]
    BadHeader(String),
    /// Metadata points to a wrong place or is inconsistent.
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// The image uses a feature this implementation refuses.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
}

impl From<FormatError> for BdevError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::IncompatibleFeatures(_)
            | FormatError::Unsupported(_)
            | FormatError::BadVersion(_) => BdevError::Unsupported(e.to_string()),
            _ => BdevError::Corrupt(e.to_string()),
        }
    }
}

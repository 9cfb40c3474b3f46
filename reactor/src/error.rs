use thiserror::Error;

/// Errors of the reactor runtime.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReactorError {
    /// The core mask or list could not be parsed.
    #[error("invalid core mask or list {0:?}: {1}")]
    InvalidCoreSpec(String, String),
    /// A core is named that this machine (or this process's affinity) does not have.
    #[error(
        "core {core} does not exist or is not available to this process (available: {available})"
    )]
    CoreNotAvailable { core: usize, available: String },
    /// A core is named twice.
    #[error("core {0} is given twice")]
    DuplicateCore(usize),
    /// The core set is empty.
    #[error("no cores given")]
    NoCores,
    /// A reactor index is out of range.
    #[error("no reactor with index {0}")]
    NoSuchReactor(usize),
    /// The runtime is shutting down and takes no new work.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// An OS-level failure while starting a reactor.
    #[error("starting reactor on core {core}: {msg}")]
    Start { core: usize, msg: String },
}

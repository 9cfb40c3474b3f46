//! A job type, as its driver declares it: the type is open (any driver names
//! its own), the framework only asks whether it is a block job.

/// The type of a job (QAPI `JobType`, an open set here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobKind {
    /// The QAPI name (`"stream"`, `"create"`...).
    pub name: &'static str,
    /// Listed by `query-block-jobs`, addressed by `block-job-*`, announced
    /// with `BLOCK_JOB_*` events (QEMU's `is_block_job`).
    pub block_job: bool,
}

impl JobKind {
    /// The QAPI name.
    pub fn as_str(&self) -> &'static str {
        self.name
    }

    /// Whether jobs of this kind are block jobs.
    pub fn is_block_job(&self) -> bool {
        self.block_job
    }
}

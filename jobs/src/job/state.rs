//! QEMU's job state machine and verb table (`job.c`: `JobSTT`, `JobVerbTable`),
//! as pure data: which status may follow which, and which command a job
//! accepts in which status.

use std::fmt;

/// A job's status (QAPI `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not yet created (internal starting point).
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused by the user or by an error (`stop` policy).
    Paused,
    /// Converged, waiting for completion (mirror-like jobs).
    Ready,
    /// A ready job that is paused.
    Standby,
    /// Finished its work, waiting for the rest of its transaction.
    Waiting,
    /// Ready to finalize (needs `job-finalize` without auto-finalize).
    Pending,
    /// Being cancelled or failed; cleaning up.
    Aborting,
    /// Done; waiting to be dismissed (without auto-dismiss).
    Concluded,
    /// Gone.
    Null,
}

/// Every status, in QEMU's table order.
pub const ALL_STATUSES: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

impl JobStatus {
    fn index(self) -> usize {
        self as usize
    }

    /// The QAPI name (`"running"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether the job has finished its work (QEMU's `job_is_completed`).
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command on a job (QAPI `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel` / `block-job-cancel`.
    Cancel,
    /// `job-pause` / `block-job-pause`.
    Pause,
    /// `job-resume` / `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete` / `block-job-complete`.
    Complete,
    /// `job-finalize` / `block-job-finalize`.
    Finalize,
    /// `job-dismiss` / `block-job-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// The QAPI name (`"set-speed"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

//                               U  C  R  P  Y  S  W  D  X  E  N
const STT: [[u8; 11]; 11] = [
    /* U */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    /* C */ [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    /* R */ [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    /* P */ [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    /* Y */ [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    /* S */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* W */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    /* D */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* X */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* E */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    /* N */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];

//                                   U  C  R  P  Y  S  W  D  X  E  N
fn verb_row(v: JobVerb) -> [u8; 11] {
    match v {
        JobVerb::Cancel => [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        JobVerb::Pause => [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        JobVerb::Resume => [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        JobVerb::SetSpeed => [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        JobVerb::Complete => [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        JobVerb::Finalize => [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        JobVerb::Dismiss => [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        JobVerb::Change => [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    }
}

/// Whether a job in `from` may move to `to` (QEMU's `JobSTT`).
pub fn can_transition(from: JobStatus, to: JobStatus) -> bool {
    STT[from.index()][to.index()] == 1
}

/// Whether a job in `status` accepts `verb` (QEMU's `JobVerbTable`).
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    verb_row(verb)[status.index()] == 1
}

/// QEMU's message for a refused verb.
pub fn verb_refused_message(id: &str, status: JobStatus, verb: JobVerb) -> String {
    format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{}'",
        verb.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    #[test]
    fn lifecycle_paths_are_legal() {
        let ok = [
            vec![
                Undefined, Created, Running, Waiting, Pending, Concluded, Null,
            ],
            vec![
                Undefined, Created, Running, Paused, Running, Aborting, Concluded, Null,
            ],
            vec![Created, Aborting, Aborting, Concluded],
            vec![Running, Ready, Standby, Ready, Waiting],
            vec![Created, Null],
        ];
        for path in ok {
            for w in path.windows(2) {
                assert!(
                    can_transition(w[0], w[1]),
                    "{} -> {} must be legal",
                    w[0],
                    w[1]
                );
            }
        }
    }

    #[test]
    fn illegal_transitions_are_refused() {
        for (a, b) in [
            (Null, Created),
            (Concluded, Running),
            (Paused, Waiting),
            (Running, Concluded),
            (Pending, Running),
            (Waiting, Running),
        ] {
            assert!(!can_transition(a, b), "{a} -> {b} must be illegal");
        }
        // Null is terminal.
        assert!(ALL_STATUSES.iter().all(|&s| !can_transition(Null, s)));
    }

    #[test]
    fn verb_table_matches_qemu() {
        assert!(verb_allowed(JobVerb::Cancel, Running));
        assert!(verb_allowed(JobVerb::Cancel, Pending));
        assert!(!verb_allowed(JobVerb::Cancel, Concluded));
        assert!(verb_allowed(JobVerb::Pause, Paused));
        assert!(!verb_allowed(JobVerb::Pause, Waiting));
        assert!(verb_allowed(JobVerb::SetSpeed, Created));
        assert!(!verb_allowed(JobVerb::SetSpeed, Pending));
        assert!(verb_allowed(JobVerb::Finalize, Pending));
        assert!(!verb_allowed(JobVerb::Finalize, Running));
        assert!(verb_allowed(JobVerb::Dismiss, Concluded));
        assert!(!verb_allowed(JobVerb::Dismiss, Running));
        assert!(!verb_allowed(JobVerb::Complete, Running));
        assert!(verb_allowed(JobVerb::Complete, Ready));
        let n = ALL_STATUSES
            .iter()
            .filter(|&&s| verb_allowed(JobVerb::Cancel, s))
            .count();
        assert_eq!(n, 7);
    }

    #[test]
    fn refusal_message_is_qemus() {
        assert_eq!(
            verb_refused_message("job0", Concluded, JobVerb::SetSpeed),
            "Job 'job0' in state 'concluded' cannot accept command verb 'set-speed'"
        );
    }
}

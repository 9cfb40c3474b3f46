//! The table of jobs: ids, node blockers, lookups.

use super::control::{Job, JobSpec};
use super::event::{discard, EventSink};
use super::state::JobStatus;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Why a job could not be created or found.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The id is malformed (QEMU's `id_wellformed`).
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// A job with that id exists.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// A node is used by another job.
    #[error("Node '{node}' is busy: block device is in use by block job: {job_type}")]
    NodeBusy { node: String, job_type: String },
    /// No job with that id (block-job-* commands: class DeviceNotActive).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    /// No job with that id (job-* commands).
    #[error("Job not found")]
    JobNotFound,
    /// The job refused the command in its current state (the message says why).
    #[error("{0}")]
    Refused(String),
}

/// QEMU's `id_wellformed`: a letter first, then letters, digits, '-', '.', '_'.
pub fn id_wellformed(id: &str) -> bool {
    let mut ch = id.chars();
    matches!(ch.next(), Some(c) if c.is_ascii_alphabetic())
        && ch.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Every job of the service. Jobs leave the table when they reach `null`.
#[derive(Clone)]
pub struct JobManager {
    jobs: Arc<Mutex<BTreeMap<String, Arc<Job>>>>,
    sink: EventSink,
}

impl Default for JobManager {
    fn default() -> Self {
        Self::new(discard())
    }
}

impl JobManager {
    /// A table whose jobs hand their events to `sink`.
    pub fn new(sink: EventSink) -> Self {
        Self {
            jobs: Arc::default(),
            sink,
        }
    }

    fn live(m: &BTreeMap<String, Arc<Job>>) -> impl Iterator<Item = &Arc<Job>> {
        m.values().filter(|j| j.status() != JobStatus::Null)
    }

    /// Creates a job (status `created`) after checking its id and that none of
    /// its nodes is used by another job.
    pub fn create(&self, spec: JobSpec) -> Result<Arc<Job>, JobError> {
        if !id_wellformed(&spec.id) {
            return Err(JobError::InvalidId(spec.id));
        }
        let mut m = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, j| j.status() != JobStatus::Null);
        if m.contains_key(&spec.id) {
            return Err(JobError::IdInUse(spec.id));
        }
        for n in &spec.nodes {
            if let Some(j) = Self::live(&m).find(|j| j.spec().nodes.contains(n)) {
                return Err(JobError::NodeBusy {
                    node: n.clone(),
                    job_type: j.spec().kind.as_str().into(),
                });
            }
        }
        let job = Arc::new(Job::new(spec, self.sink.clone()));
        m.insert(job.id().to_string(), job.clone());
        Ok(job)
    }

    /// The job using `node`, if any.
    pub fn job_on_node(&self, node: &str) -> Option<Arc<Job>> {
        let m = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let found = Self::live(&m)
            .find(|j| j.spec().nodes.iter().any(|n| n == node))
            .cloned();
        found
    }

    /// Looks a job up for a `block-job-*` command.
    pub fn block_job(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.get(id)
            .filter(|j| j.spec().kind.is_block_job())
            .ok_or_else(|| JobError::BlockJobNotFound(id.to_string()))
    }

    /// Looks a job up for a `job-*` command.
    pub fn job(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.get(id).ok_or(JobError::JobNotFound)
    }

    fn get(&self, id: &str) -> Option<Arc<Job>> {
        let m = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).filter(|j| j.status() != JobStatus::Null).cloned()
    }

    /// Every job not yet dismissed, by id.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let mut m = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, j| j.status() != JobStatus::Null);
        m.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobEvent, JobKind, OnError};

    fn spec(id: &str, nodes: &[&str]) -> JobSpec {
        JobSpec {
            id: id.into(),
            kind: JobKind {
                name: "stream",
                block_job: true,
            },
            device: id.into(),
            speed: 0,
            on_error: OnError::Report,
            auto_finalize: true,
            auto_dismiss: true,
            legacy: false,
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            throttle: None,
        }
    }

    #[test]
    fn ids_and_blockers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let m = JobManager::new(Arc::new(move |e: &JobEvent| {
            s2.lock().unwrap().push(e.clone());
        }));
        assert_eq!(
            m.create(spec("", &[])).unwrap_err().to_string(),
            "Invalid job ID ''"
        );
        assert_eq!(
            m.create(spec("0x", &[])).unwrap_err().to_string(),
            "Invalid job ID '0x'"
        );
        let j = m.create(spec("s1", &["node4", "node3"])).unwrap();
        assert_eq!(j.status(), JobStatus::Created);
        assert_eq!(
            m.create(spec("s1", &[])).unwrap_err().to_string(),
            "Job ID 's1' already in use"
        );
        assert_eq!(
            m.create(spec("s2", &["node5", "node4"]))
                .unwrap_err()
                .to_string(),
            "Node 'node4' is busy: block device is in use by block job: stream"
        );
        assert!(m.create(spec("s3", &["node2"])).is_ok());
        assert_eq!(
            m.block_job("nope").unwrap_err().to_string(),
            "Block job 'nope' not found"
        );
        assert_eq!(m.job("nope").unwrap_err().to_string(), "Job not found");
        let ev = seen.lock().unwrap();
        assert_eq!(
            ev[0],
            JobEvent::StatusChange {
                id: "s1".into(),
                status: JobStatus::Created
            }
        );
    }
}

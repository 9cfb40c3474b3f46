//! A job's filter node (`filter-node-name`): QEMU's stream, commit and
//! mirror insert one above the node they work on while they run (see
//! `bdev::filter`: in sluice it is only what a client sees, never in the data
//! path). [`FilterNode::insert`] registers it under its name (refused in
//! QEMU's words when the name is ill-formed or taken, so no other node can
//! take it while the job runs); [`Filtered`] wraps the job's driver and
//! removes the node when the job is cleaned up, before it concludes, or
//! when the driver is dropped without running (the job could not start).

use super::control::Job;
use super::driver::{JobDriver, Step};
use super::manager::id_wellformed;
use bdev::filter::{FilterBdev, FilterKind};
use bdev::Bdev;
use graph::Graph;
use std::sync::Arc;

/// Why a filter node cannot be made (QEMU's `bdrv_assign_node_name` words).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// Not a well-formed node name.
    #[error("Invalid node-name: '{0}'")]
    Invalid(String),
    /// A node of that name exists.
    #[error("Duplicate nodes with node-name='{0}'")]
    Duplicate(String),
    /// 32 bytes or more.
    #[error("Node name too long")]
    TooLong,
}

/// Whether `name` could be given to a new node of `g`, in QEMU's order.
pub fn check_name(g: &Graph, name: &str) -> Result<(), FilterError> {
    if !id_wellformed(name) {
        return Err(FilterError::Invalid(name.to_string()));
    }
    if g.nodes().contains(name) {
        return Err(FilterError::Duplicate(name.to_string()));
    }
    if name.len() >= 32 {
        return Err(FilterError::TooLong);
    }
    Ok(())
}

/// A registered filter node; unregistered when dropped.
pub struct FilterNode {
    graph: Arc<Graph>,
    name: String,
}

impl FilterNode {
    /// Registers a `kind` filter named `name` over `child`.
    pub fn insert(
        g: &Arc<Graph>,
        name: &str,
        kind: FilterKind,
        child: &Arc<dyn Bdev>,
    ) -> Result<FilterNode, FilterError> {
        check_name(g, name)?;
        let b: Arc<dyn Bdev> = FilterBdev::new(name, kind, child);
        g.register(b)
            .map_err(|_| FilterError::Duplicate(name.to_string()))?;
        Ok(FilterNode {
            graph: g.clone(),
            name: name.to_string(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for FilterNode {
    fn drop(&mut self) {
        if let Err(e) = self.graph.delete_from_reactor(&self.name) {
            tracing::warn!(node = %self.name, error = %e, "job filter node already gone");
        }
    }
}

/// A job's driver with the job's filter node, which goes when the job is
/// cleaned up (after the driver's own `clean`).
pub struct Filtered<D> {
    inner: D,
    filter: Option<FilterNode>,
}

impl<D: JobDriver> Filtered<D> {
    /// `inner`, with `filter` (none: as `inner` alone).
    pub fn new(inner: D, filter: Option<FilterNode>) -> Self {
        Self { inner, filter }
    }
}

impl<D: JobDriver> JobDriver for Filtered<D> {
    fn run<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        self.inner.run(job)
    }
    fn prepare<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, Result<(), String>> {
        self.inner.prepare(job)
    }
    fn commit<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        self.inner.commit(job)
    }
    fn abort<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        self.inner.abort(job)
    }
    fn clean<'a>(&'a mut self, job: &'a Arc<Job>) -> Step<'a, ()> {
        Box::pin(async move {
            self.inner.clean(job).await;
            drop(self.filter.take());
        })
    }
}

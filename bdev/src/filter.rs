//! The filter node a block job shows above the node it works on while it
//! runs: QEMU's `copy-on-read` (a stream's), `commit_top` (an intermediate
//! commit's) and `mirror_top` (a mirror's and an active commit's), named by
//! the job's `filter-node-name`.
//!
//! sluice's jobs need no node in the data path (a stream's copier populates
//! the top itself, and a mirror tracks the device's writes in the device), so
//! a [`FilterBdev`] is only what a client sees: a registered node with the
//! filter's driver over its child, whose requests are the child's (its
//! channel *is* the child's). It holds its child weakly: a job that releases
//! the child (a commit's intermediate layers) closes it as before, and the
//! filter then has no channel to give.

use crate::bdev::{Bdev, Channel, RangeStatusFuture};
use crate::error::BdevError;
use crate::io::IoType;
use serde_json::{json, Value};
use std::any::Any;
use std::sync::{Arc, Weak};

/// Which of QEMU's job filters a node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    /// A stream's `copy-on-read` node.
    CopyOnRead,
    /// An intermediate commit's `commit_top` node.
    CommitTop,
    /// A mirror's (or an active commit's) `mirror_top` node.
    MirrorTop,
}

impl FilterKind {
    /// QEMU's driver name.
    pub fn driver(self) -> &'static str {
        match self {
            FilterKind::CopyOnRead => "copy-on-read",
            FilterKind::CommitTop => "commit_top",
            FilterKind::MirrorTop => "mirror_top",
        }
    }
}

/// A job's filter node over `child` (see the module doc).
pub struct FilterBdev {
    name: String,
    kind: FilterKind,
    child: Weak<dyn Bdev>,
    block_size: u32,
    num_blocks: u64,
}

impl FilterBdev {
    /// A filter named `name` of `kind` over `child`.
    pub fn new(name: &str, kind: FilterKind, child: &Arc<dyn Bdev>) -> Arc<FilterBdev> {
        Arc::new(FilterBdev {
            name: name.to_string(),
            kind,
            child: Arc::downgrade(child),
            block_size: child.block_size(),
            num_blocks: child.num_blocks(),
        })
    }

    /// Which filter it is.
    pub fn kind(&self) -> FilterKind {
        self.kind
    }

    /// The node below, while it lives.
    pub fn child(&self) -> Option<Arc<dyn Bdev>> {
        self.child.upgrade()
    }

    /// The filter behind `b`, if `b` is one.
    pub fn from_bdev(b: &Arc<dyn Bdev>) -> Option<&FilterBdev> {
        b.as_any().downcast_ref::<FilterBdev>()
    }

    fn live_child(&self) -> Result<Arc<dyn Bdev>, BdevError> {
        self.child()
            .ok_or_else(|| BdevError::NotFound(self.name.clone()))
    }
}

impl Bdev for FilterBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        self.kind.driver()
    }
    fn block_size(&self) -> u32 {
        self.child().map_or(self.block_size, |c| c.block_size())
    }
    fn num_blocks(&self) -> u64 {
        self.child().map_or(self.num_blocks, |c| c.num_blocks())
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.child().is_some_and(|c| c.io_type_supported(t))
    }
    fn required_alignment(&self) -> u32 {
        self.child().map_or(1, |c| c.required_alignment())
    }
    fn read_only(&self) -> bool {
        // QEMU's commit_top shows read-only (it passes writes, but the
        // intermediate layer under it is written by nobody but the job).
        self.kind == FilterKind::CommitTop || self.child().is_none_or(|c| c.read_only())
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        self.live_child()?.create_channel()
    }
    fn filename(&self) -> Option<String> {
        self.child().and_then(|c| c.filename())
    }
    fn driver_specific(&self) -> Value {
        let child = self.child().map(|c| c.name().to_string());
        json!({ "filter": { "driver": self.kind.driver(), "child": child } })
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        self.child()?.range_status(offset, len)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

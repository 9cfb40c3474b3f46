//! The image lock of a backing file while something writes it.
//!
//! A qcow2 image that became a backing file (a snapshot's old top) holds a
//! reader's lock (see [`crate::snapshot::lower_to_backing`]). What writes it
//! for a moment, a stream into it or `change-backing-file`, takes a writer's
//! lock in place (QEMU reopens the node read-write) through a
//! [`WriterLock`]; dropping the guard gives the reader's lock back, so the
//! two cannot be paired by hand wrongly. Another process reading the file
//! meanwhile makes the raise fail with QEMU's lock error.

use bdev::lock::{Perms, PERM_WRITE};
use bdev::qcow2::Qcow2Bdev;
use bdev::{Bdev, BdevError};
use std::sync::Arc;

/// While alive, `node` holds a writer's image lock if it held a reader's
/// when the guard was taken; dropped, a reader's again.
pub struct WriterLock {
    node: Arc<dyn Bdev>,
    raised: bool,
}

impl WriterLock {
    /// Raises `node`'s lock to a writer's when it is a writable qcow2 image
    /// holding a reader's; otherwise the guard does nothing.
    pub fn raise(node: &Arc<dyn Bdev>) -> Result<WriterLock, BdevError> {
        let raised = match node.as_any().downcast_ref::<Qcow2Bdev>() {
            Some(q) => match q.lock_perms() {
                Some(p) if p.perm & PERM_WRITE == 0 && !q.read_only() => {
                    q.set_lock_perms(Perms::WRITER)?;
                    true
                }
                _ => false,
            },
            None => false,
        };
        Ok(WriterLock {
            node: node.clone(),
            raised,
        })
    }

    /// Disarms the guard: the node keeps its writer's lock for good (it
    /// became a device's active layer).
    pub fn keep(mut self) {
        self.raised = false;
    }

    /// Whether the guard raised the lock (and will lower it).
    pub fn raised(&self) -> bool {
        self.raised
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        if self.raised {
            crate::snapshot::lower_to_backing(&self.node);
        }
    }
}

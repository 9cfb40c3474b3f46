//! A node reopened read-write for a job (QEMU's
//! `bdrv_reopen_set_read_only(bs, false)` in `commit_start`,
//! `commit_active_start`, `bdrv_drop_intermediate`), given back read-only at
//! the job's end (QEMU's `commit_clean`, `mirror_exit_common`).
//!
//! [`ReadWrite::reopen`] reopens a read-only node in place through
//! [`bdev::Bdev::reopen`] (its file opened again for writing, an image's
//! engine allowed to write; name, claims and users unchanged); a node that
//! is writable already is left as it is and the guard does nothing.
//! [`ReadWrite::restore`] reopens it read-only again (the job stopped
//! writing it); [`ReadWrite::keep`] leaves it writable for good (it became a
//! device's active layer, as QEMU's mirror reopens the target as the node it
//! replaces). A guard dropped without either reopens the node read-only on
//! the reactor it is dropped on (or, off the reactors, on reactor 0), later.
//!
//! The image lock is not this guard's: raise it with
//! [`crate::lock::WriterLock`] after the reopen and drop that before
//! [`ReadWrite::restore`].

use bdev::{Bdev, BdevError};
use std::sync::Arc;

/// While alive, `node` is writable; see the module doc.
pub struct ReadWrite {
    node: Arc<dyn Bdev>,
    reopened: bool,
}

/// Why a node cannot be reopened read-write.
#[derive(Debug)]
pub enum ReopenError {
    /// The node's driver cannot change its mode (QEMU's "Block node is
    /// read-only").
    Unsupported,
    /// The reopen failed (a file that cannot be opened for writing: QEMU's
    /// "Could not open '<path>': <reason>", as [`std::fmt::Display`] gives it).
    Failed(BdevError),
}

impl std::fmt::Display for ReopenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReopenError::Unsupported => write!(f, "Block node is read-only"),
            ReopenError::Failed(BdevError::Os { what, source }) => {
                // strerror's text alone, as QEMU's error_setg_errno writes it.
                let text = source.to_string();
                let text = text.split(" (os error").next().unwrap_or_default();
                write!(f, "{what}: {text}")
            }
            ReopenError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl ReadWrite {
    /// Reopens `node` read-write if it is read-only. Call on a reactor.
    pub async fn reopen(node: &Arc<dyn Bdev>) -> Result<ReadWrite, ReopenError> {
        let mut g = ReadWrite {
            node: node.clone(),
            reopened: false,
        };
        if node.read_only() {
            node.reopen(false)
                .ok_or(ReopenError::Unsupported)?
                .await
                .map_err(ReopenError::Failed)?;
            g.reopened = true;
        }
        Ok(g)
    }

    /// Like [`ReadWrite::reopen`], from a thread that is not a reactor (an
    /// RPC handler's): runs on reactor `on` and waits.
    pub fn reopen_blocking(
        rt: &reactor::RuntimeHandle,
        on: usize,
        node: &Arc<dyn Bdev>,
    ) -> Result<ReadWrite, ReopenError> {
        let n = node.clone();
        rt.spawn_on(on, move || async move { ReadWrite::reopen(&n).await })
            .block()
            .map_err(|e| ReopenError::Failed(BdevError::Runtime(e.to_string())))?
    }

    /// Whether the guard reopened the node (and will give it back read-only).
    pub fn reopened(&self) -> bool {
        self.reopened
    }

    /// The node.
    pub fn node(&self) -> &Arc<dyn Bdev> {
        &self.node
    }

    /// Reopens the node read-only again if the guard reopened it. Call on a
    /// reactor.
    pub async fn restore(mut self) {
        if std::mem::take(&mut self.reopened) {
            back_to_read_only(self.node.clone()).await;
        }
    }

    /// Disarms the guard: the node stays writable.
    pub fn keep(mut self) {
        self.reopened = false;
    }
}

async fn back_to_read_only(node: Arc<dyn Bdev>) {
    let Some(f) = node.reopen(true) else {
        return;
    };
    if let Err(e) = f.await {
        tracing::warn!(node = %node.name(), error = %e, "node not reopened read-only");
    }
}

impl Drop for ReadWrite {
    fn drop(&mut self) {
        if !self.reopened {
            return;
        }
        let node = self.node.clone();
        let here = reactor::current_index();
        let rt = reactor::handle();
        match (rt, here) {
            (Some(rt), Some(i)) => {
                drop(rt.spawn_on(i, move || back_to_read_only(node)));
            }
            _ => {
                tracing::warn!(node = %self.node.name(), "left writable: dropped off the reactors")
            }
        }
    }
}

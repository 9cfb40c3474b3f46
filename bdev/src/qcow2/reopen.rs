//! Reopening an open image read-write or read-only in place (QEMU's
//! `bdrv_reopen_set_read_only` on a qcow2 node and its file), for a job that
//! writes a layer libvirt added read-only (a commit's base) and gives it back
//! read-only at its end.
//!
//! - **Read-write**: the image's file is reopened for writing first
//!   ([`crate::Bdev::reopen`]: a new open file behind the same descriptor),
//!   then the engine passes what a writable open passes (no corrupt bit, no
//!   internal snapshots, the tables checked as a writer checks them, a dirty
//!   bit's refcounts rebuilt, refcounts that miss clusters in use repaired,
//!   autoclear features cleared) and starts writing; an image that opened its
//!   file itself has it extended for growth as a writable open does (trimmed
//!   again when it goes back, or at close). Any failure leaves the image and
//!   its file read-only as they were.
//! - **Read-only**: what was written is flushed, the file trimmed, the engine
//!   stops writing, and the image's own file is reopened read-only. The
//!   caller has stopped its writers first.
//!
//! The node keeps its name, claims and channels; the image lock is the
//! caller's ([`crate::lock`]: `graph::lock::WriterLock` raises it once the
//! image is writable). Every reactor's cached channels are refreshed before
//! the call returns.

use super::bdev::{track_grown, Qcow2Bdev};
use super::format::INCOMPAT_CORRUPT;
use super::image::{check_tables, Image, R};
use crate::{Bdev, BdevError, IoStatus};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Qcow2Bdev {
    /// Whether writes are refused now.
    pub(crate) fn ro(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Reopens the image read-only (`true`) or read-write in place (see the
    /// module doc). Call on a reactor.
    pub async fn reopen(&self, read_only: bool) -> Result<(), BdevError> {
        if read_only == self.ro() {
            return Ok(());
        }
        let r = if read_only {
            self.reopen_ro().await
        } else {
            self.reopen_rw().await
        };
        refresh_everywhere(&self.rt).await;
        r
    }

    async fn reopen_rw(&self) -> Result<(), BdevError> {
        let base = self.base.clone();
        let base_was_ro = base.read_only();
        if base_was_ro {
            base.reopen(false)
                .ok_or(BdevError::Io(IoStatus::ReadOnly))?
                .await?;
            // The engine's channel to its file (on the owner) writes through
            // the new open file before anything is written.
            refresh_everywhere(&self.rt).await;
        }
        let own_file = self.info().filename.is_some();
        let b = base.clone();
        let r = self
            .on_owner(move |img| async move { img.reopen_rw(&b, own_file).await })
            .await;
        match r {
            Ok(grown_from) => {
                self.read_only.store(false, Ordering::Release);
                if let (Some(from), Some(me)) = (grown_from, self.me.upgrade()) {
                    track_grown(&me, from);
                }
                tracing::info!(image = %self.name, "reopened read-write");
                Ok(())
            }
            Err(e) => {
                if base_was_ro {
                    if let Some(f) = base.reopen(true) {
                        if let Err(e) = f.await {
                            tracing::warn!(image = %self.name, error = %e, "file not reopened read-only");
                        }
                    }
                }
                Err(e)
            }
        }
    }

    async fn reopen_ro(&self) -> Result<(), BdevError> {
        self.flush().await?;
        self.trim_file().await?;
        self.on_owner(|img| async move {
            img.read_only.set(true);
            Ok(())
        })
        .await?;
        self.read_only.store(true, Ordering::Release);
        if self.info().filename.is_some() {
            if let Some(f) = self.base.reopen(true) {
                // The engine writes no more: a file left writable is harmless.
                if let Err(e) = f.await {
                    tracing::warn!(image = %self.name, error = %e, "file not reopened read-only");
                }
            }
        }
        tracing::info!(image = %self.name, "reopened read-only");
        Ok(())
    }
}

impl Image {
    /// The engine's part of a reopen read-write: a writable open's checks
    /// and repairs, then (`grow`) the base extended for growth. Returns the
    /// base's length before it grew (never trimmed below), if it did.
    async fn reopen_rw(&self, base: &Arc<dyn Bdev>, grow: bool) -> R<Option<u64>> {
        {
            let h = self.hdr.borrow();
            if h.incompatible & INCOMPAT_CORRUPT != 0 || self.corrupt.get() {
                return Err(BdevError::Unsupported(format!(
                    "image '{}' is marked corrupt: it stays read-only",
                    self.name
                )));
            }
            if h.nb_snapshots > 0 {
                return Err(BdevError::Unsupported(format!(
                    "writing images with internal snapshots ({} here); open read-only",
                    h.nb_snapshots
                )));
            }
            check_tables(
                &h,
                &self.l1.borrow(),
                &self.reftable.borrow(),
                self.capacity.get(),
                true,
            )?;
        }
        self.read_only.set(false);
        let r = self.become_writable(base, grow).await;
        if r.is_err() {
            self.read_only.set(true);
        }
        r
    }

    async fn become_writable(&self, base: &Arc<dyn Bdev>, grow: bool) -> R<Option<u64>> {
        let (dirty, autoclear) = {
            let h = self.hdr.borrow();
            (
                h.incompatible & super::format::INCOMPAT_DIRTY != 0,
                h.autoclear,
            )
        };
        if dirty {
            tracing::warn!(image = %self.name, "image has the dirty bit set: rebuilding refcounts");
            self.rebuild_refcounts().await?;
        } else if let Some(refs) = self.uncovered_references().await? {
            tracing::warn!(image = %self.name, "refcounts do not cover the clusters in use: repairing them");
            self.repair_refcounts(refs).await?;
        }
        if autoclear != 0 {
            self.hdr.borrow_mut().autoclear = 0;
            self.write_header().await?;
        }
        if !grow {
            return Ok(None);
        }
        let from = self.capacity.get();
        self.reserve_room(base, self.size.get()).await;
        if self.capacity.get() == from {
            return Ok(None);
        }
        let used = self.used_end().await?;
        self.fresh_from
            .set(from.next_multiple_of(self.cs).max(used));
        Ok(Some(from))
    }
}

/// Every reactor's cached channels checked against sizes and modes again.
async fn refresh_everywhere(rt: &reactor::RuntimeHandle) {
    for r in rt.broadcast(crate::refresh_channel_sizes).await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "a reactor's channels not refreshed");
        }
    }
}

//! The qcow2 bdev as an [`ImageNode`].

use crate::node::{ChainStatus, ImageNode, NodeFuture};
use bdev::qcow2::Qcow2Bdev;
use bdev::{Bdev, DmaBuf};
use std::sync::Arc;

/// A qcow2 image node.
struct Qcow2Node {
    bdev: Arc<dyn Bdev>,
}

impl Qcow2Node {
    fn q(&self) -> &Qcow2Bdev {
        // Invariant: built by `resolve` only for bdevs that downcast to Qcow2Bdev.
        self.bdev
            .as_any()
            .downcast_ref::<Qcow2Bdev>()
            .expect("Qcow2Node over a qcow2 bdev")
    }
}

/// The image view of `b` when it is a qcow2 image.
pub(crate) fn resolve(b: &Arc<dyn Bdev>) -> Option<Arc<dyn ImageNode>> {
    b.as_any().downcast_ref::<Qcow2Bdev>()?;
    Some(Arc::new(Qcow2Node { bdev: b.clone() }))
}

impl ImageNode for Qcow2Node {
    fn bdev(&self) -> Arc<dyn Bdev> {
        self.bdev.clone()
    }
    fn format(&self) -> &'static str {
        self.q().format()
    }
    fn cluster_size(&self) -> u64 {
        self.q().cluster_size()
    }
    fn owner(&self) -> usize {
        self.q().owner()
    }
    fn filename(&self) -> Option<String> {
        self.q().filename().map(|p| p.display().to_string())
    }
    fn file_child(&self) -> Option<Arc<dyn Bdev>> {
        Some(self.q().base().clone())
    }
    fn backing(&self) -> Option<Arc<dyn Bdev>> {
        self.q().backing()
    }
    fn backing_file(&self) -> Option<String> {
        self.q().backing_file()
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
        base: Option<&'a Arc<dyn Bdev>>,
    ) -> NodeFuture<'a, ChainStatus> {
        Box::pin(async move {
            let s = self.q().block_status(offset, len, base).await?;
            Ok(ChainStatus {
                allocated_here: s.allocated_here,
                allocated_above_base: s.allocated_above_base,
                zero: s.zero,
                len: s.len,
            })
        })
    }
    fn populate_if_unallocated(&self, offset: u64, data: DmaBuf) -> NodeFuture<'_, bool> {
        Box::pin(self.q().populate_if_unallocated(offset, data))
    }
    fn populate_range_if_unallocated(
        &self,
        offset: u64,
        data: DmaBuf,
        write_behind: bool,
    ) -> NodeFuture<'_, (DmaBuf, u64)> {
        Box::pin(
            self.q()
                .populate_range_if_unallocated(offset, data, write_behind),
        )
    }
    fn populate_zero_if_unallocated(&self, offset: u64, len: u64) -> NodeFuture<'_, u64> {
        Box::pin(self.q().populate_zero_if_unallocated(offset, len))
    }
    fn set_backing_file<'a>(
        &'a self,
        file: Option<&'a str>,
        format: Option<&'a str>,
        durable: bool,
    ) -> NodeFuture<'a, ()> {
        Box::pin(self.q().set_backing_file_with(file, format, durable))
    }
    fn set_backing_bdev(&self, backing: Option<Arc<dyn Bdev>>) -> NodeFuture<'_, ()> {
        Box::pin(self.q().set_backing_bdev(backing))
    }
}

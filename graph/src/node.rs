//! The image nodes block jobs work on: a bdev (its name is the node name) plus,
//! for image formats with a backing chain, the operations a job needs.
//!
//! The qcow2 bdev provides them; other formats (and test doubles) register a
//! [`Provider`]. Plain bdevs (raw files, malloc, NVMe) are chain bottoms: no
//! backing, every block allocated.

use bdev::{Bdev, BdevError, DmaBuf};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// A local (`!Send`) future of a node operation.
pub type NodeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BdevError>> + 'a>>;

/// Allocation status of the start of a range, seen from an image with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStatus {
    /// Allocated in the image itself.
    pub allocated_here: bool,
    /// Allocated in the image or a backing image above `base` (excluded).
    pub allocated_above_base: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Bytes from the queried offset over which this holds (> 0).
    pub len: u64,
}

/// An image with a backing chain (qcow2).
pub trait ImageNode: Send + Sync {
    /// The node as a bdev (its name is the node name).
    fn bdev(&self) -> Arc<dyn Bdev>;
    /// The image format (`"qcow2"`).
    fn format(&self) -> &'static str;
    /// Allocation granularity in bytes.
    fn cluster_size(&self) -> u64;
    /// The reactor owning the image's metadata.
    fn owner(&self) -> usize;
    /// The image file's path, when it is a file.
    fn filename(&self) -> Option<String>;
    /// The node the image is stored on (QEMU's `file` child), when known.
    fn file_child(&self) -> Option<Arc<dyn Bdev>> {
        None
    }
    /// The bdev unallocated reads fall through to.
    fn backing(&self) -> Option<Arc<dyn Bdev>>;
    /// The backing file name recorded in the header.
    fn backing_file(&self) -> Option<String>;
    /// Allocation status at `offset` (at most `len` bytes); `base` ends "above base".
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
        base: Option<&'a Arc<dyn Bdev>>,
    ) -> NodeFuture<'a, ChainStatus>;
    /// Writes one whole cluster (shorter at the end of the image) at the
    /// cluster-aligned `offset` only if it is still unallocated here; a client
    /// write always wins. Returns whether it wrote.
    fn populate_if_unallocated(&self, offset: u64, data: DmaBuf) -> NodeFuture<'_, bool>;
    /// [`ImageNode::populate_if_unallocated`] for a buffer of several whole
    /// clusters from the cluster-aligned `offset` (the last may be shorter at
    /// the image's end): writes the clusters still unallocated, leaves the
    /// others. Returns the buffer (for reuse) and how many clusters it wrote.
    /// The default populates cluster by cluster.
    /// `write_behind`: ask the storage below to start writeback at once (for a
    /// copy that ends with a flush); the default ignores it.
    fn populate_range_if_unallocated(
        &self,
        offset: u64,
        data: DmaBuf,
        _write_behind: bool,
    ) -> NodeFuture<'_, (DmaBuf, u64)> {
        Box::pin(async move {
            let cs = self.cluster_size().max(512) as usize;
            let mut written = 0;
            let mut pos = 0;
            while pos < data.len() {
                let n = cs.min(data.len() - pos);
                let piece = DmaBuf::from_slice(&data.as_slice()[pos..pos + n])?;
                if self
                    .populate_if_unallocated(offset + pos as u64, piece)
                    .await?
                {
                    written += 1;
                }
                pos += n;
            }
            Ok((data, written))
        })
    }
    /// Makes the clusters of `[offset, offset+len)` still unallocated here read
    /// as zeroes without data (zero clusters). Returns how many it changed.
    /// `Unsupported` when the format (or version) has no zero clusters: the
    /// default.
    fn populate_zero_if_unallocated(&self, offset: u64, len: u64) -> NodeFuture<'_, u64> {
        let _ = (offset, len);
        Box::pin(async move {
            Err(BdevError::Unsupported(format!(
                "{} images have no zero clusters",
                self.format()
            )))
        })
    }
    /// Records `file`/`format` as the backing file in the header (`None`: no
    /// backing file), after making earlier writes durable (`durable`), or
    /// without that flush: metadata is still written in order, so a killed
    /// process leaves a consistent image; a power loss may lose the copy
    /// (QEMU's behaviour).
    fn set_backing_file<'a>(
        &'a self,
        file: Option<&'a str>,
        format: Option<&'a str>,
        durable: bool,
    ) -> NodeFuture<'a, ()>;
    /// Changes the bdev unallocated reads fall through to; registry claims
    /// move with the link (the node releases its claim on the old backing and
    /// claims the new one, when registered).
    fn set_backing_bdev(&self, backing: Option<Arc<dyn Bdev>>) -> NodeFuture<'_, ()>;
}

/// Recognises the image nodes of one bdev type.
pub type Provider = fn(&Arc<dyn Bdev>) -> Option<Arc<dyn ImageNode>>;

static PROVIDERS: Mutex<Vec<Provider>> = Mutex::new(Vec::new());

/// Adds a provider (idempotent).
pub fn register_provider(p: Provider) {
    let mut v = PROVIDERS.lock().unwrap_or_else(|e| e.into_inner());
    if !v.iter().any(|q| std::ptr::fn_addr_eq(*q, p)) {
        v.push(p);
    }
}

/// The image view of a bdev, if it is an image with a chain.
pub fn image(b: &Arc<dyn Bdev>) -> Option<Arc<dyn ImageNode>> {
    if let Some(i) = crate::qcow2_node::resolve(b) {
        return Some(i);
    }
    let v = PROVIDERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.iter().find_map(|p| p(b))
}

/// The bdev below `b` in its chain.
pub fn backing_of(b: &Arc<dyn Bdev>) -> Option<Arc<dyn Bdev>> {
    image(b).and_then(|i| i.backing())
}

/// `b` and every bdev below it, top first (bounded, so a loop cannot hang us).
pub fn chain(b: &Arc<dyn Bdev>) -> Vec<Arc<dyn Bdev>> {
    let mut out = vec![b.clone()];
    while out.len() < 4096 {
        match out.last().and_then(backing_of) {
            Some(n) => out.push(n),
            None => break,
        }
    }
    out
}

/// Whether two handles are the same node.
pub fn same(a: &Arc<dyn Bdev>, b: &Arc<dyn Bdev>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// A node's filename as QEMU shows it and writes it into a header naming the
/// node as a backing file: the file path for file-backed nodes, else a
/// `json:` pseudo-filename (see [`crate::qemu_name`]).
pub fn filename_of(b: &Arc<dyn Bdev>) -> String {
    crate::qemu_name::filename(&crate::qemu_name::describe(b))
}

/// A node's driver as QEMU names it and writes it as a backing format
/// (`"qcow2"`, `"raw"`, `"file"`, `"null-co"`...).
pub fn format_of(b: &Arc<dyn Bdev>) -> String {
    crate::qemu_name::driver(&crate::qemu_name::describe(b)).to_string()
}

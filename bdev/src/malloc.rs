//! The malloc bdev: a RAM disk (SPDK's `bdev_malloc_create`). Its memory comes
//! from the DMA arena when that is backed by hugepages; otherwise from a lazily
//! populated anonymous mapping, so a large malloc bdev costs only what is written.

use crate::bdev::{Bdev, Channel};
use crate::dma::map::LazyMapping;
use crate::dma::{self, DmaBuf};
use crate::error::BdevError;
use crate::io::{BdevIo, IoStatus, IoType};
use crate::leaf::{check_geometry, uuid_or_random, LocalQueue};
use reactor::PollerHandle;
use serde_json::{json, Value};
use std::any::Any;
use std::rc::Rc;
use std::sync::Arc;

enum Storage {
    /// A block of the hugepage arena.
    Arena(DmaBuf),
    /// Ordinary pages, populated on first touch.
    Lazy(LazyMapping),
}

/// The memory of a malloc bdev, shared by the bdev and its channels.
struct Memory {
    storage: Storage,
    base: *mut u8,
    size: usize,
}

// SAFETY: `base` points into `storage`, which this value owns for its whole life;
// channels on several reactors read and write it through raw pointers only, with
// the semantics of a disk (overlapping concurrent requests have unspecified results).
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

/// A bdev held in memory.
pub struct MallocBdev {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: String,
    mem: Arc<Memory>,
}

/// How a malloc bdev gets its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MallocOptions {
    /// Fault every page in at creation (as SPDK's malloc bdev does) instead of
    /// on first write: costs the whole size in RAM at once, spares the data
    /// path page faults (benchmarks). Memory from the hugepage arena is always
    /// populated.
    pub populate: bool,
}

impl MallocBdev {
    /// A zero-filled RAM bdev of `num_blocks` blocks of `block_size` bytes. The
    /// caller registers it (see [`crate::registry`]).
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<String>,
    ) -> Result<Arc<MallocBdev>, BdevError> {
        Self::with_options(name, num_blocks, block_size, uuid, MallocOptions::default())
    }

    /// Like [`MallocBdev::new`] with explicit options.
    pub fn with_options(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<String>,
        opts: MallocOptions,
    ) -> Result<Arc<MallocBdev>, BdevError> {
        check_geometry(name, num_blocks, block_size)?;
        let uuid = uuid_or_random(uuid)?;
        let size = usize::try_from(num_blocks * block_size as u64).map_err(|_| {
            BdevError::InvalidParam("num_blocks: too large for this machine".into())
        })?;
        let storage = if dma::hugepages_in_use() {
            match DmaBuf::new_hugepage(size) {
                Ok(b) => Storage::Arena(b),
                Err(e) => {
                    tracing::warn!(bdev = name, error = %e, "no hugepage memory for malloc bdev; using ordinary pages");
                    Storage::Lazy(LazyMapping::new(size)?)
                }
            }
        } else {
            Storage::Lazy(LazyMapping::new(size)?)
        };
        if let (Storage::Lazy(m), true) = (&storage, opts.populate) {
            m.populate();
        }
        let base = match &storage {
            Storage::Arena(b) => b.as_ptr() as *mut u8,
            Storage::Lazy(m) => m.as_ptr(),
        };
        let mem = Arc::new(Memory {
            storage,
            base,
            size,
        });
        Ok(Arc::new(MallocBdev {
            name: name.to_string(),
            num_blocks,
            block_size,
            uuid,
            mem,
        }))
    }

    /// Whether the bdev's memory is in the hugepage arena.
    pub fn in_dma_arena(&self) -> bool {
        matches!(self.mem.storage, Storage::Arena(_))
    }
}

impl Memory {
    /// Zeroes `[off, off+len)`; ordinary pages wholly inside go back to the kernel.
    fn zero_range(&self, off: usize, len: usize) {
        if let Storage::Lazy(m) = &self.storage {
            if len >= 64 * 1024 && m.discard(off, len) {
                let head_end = off.next_multiple_of(4096).min(off + len);
                let tail_start = ((off + len) / 4096 * 4096).max(head_end);
                // SAFETY: both edges lie inside [off, off+len), inside the mapping (the
                // channel validated the range).
                unsafe {
                    std::ptr::write_bytes(self.base.add(off), 0, head_end - off);
                    std::ptr::write_bytes(self.base.add(tail_start), 0, off + len - tail_start);
                }
                return;
            }
        }
        // SAFETY: the range was validated against the bdev's size by the channel.
        unsafe { std::ptr::write_bytes(self.base.add(off), 0, len) };
    }
}

impl Bdev for MallocBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Malloc disk"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        crate::leaf::io_type_supported(t)
    }
    fn uuid(&self) -> Option<String> {
        Some(self.uuid.clone())
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let (q, poller) = LocalQueue::start(&format!("bdev_malloc_{}", self.name));
        Ok(Box::new(MallocChannel {
            base: self.mem.base,
            size: self.mem.size,
            q,
            poller,
            mem: self.mem.clone(),
        }))
    }
    fn config(&self) -> Option<Value> {
        Some(json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": self.name,
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "uuid": self.uuid,
            }
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct MallocChannel {
    base: *mut u8,
    size: usize,
    q: Rc<LocalQueue>,
    poller: PollerHandle,
    mem: Arc<Memory>,
}

impl Channel for MallocChannel {
    #[inline]
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if !self.q.has_room() {
            return Err(io);
        }
        let off = io.offset as usize;
        let len = io.len as usize;
        // The IoChannel in front validated the range; re-check cheaply so a
        // direct caller cannot reach outside the memory.
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            io.status = IoStatus::Einval;
            self.q.push(io);
            return Ok(());
        }
        match io.io_type {
            IoType::Read => {
                let mut pos = 0usize;
                for seg in io.segments_mut() {
                    let n = seg.len().min(len - pos);
                    // SAFETY: [off+pos, off+pos+n) is inside the bdev's memory (checked
                    // above) and the segment is n bytes or more.
                    unsafe {
                        std::ptr::copy_nonoverlapping(self.base.add(off + pos), seg.as_mut_ptr(), n)
                    };
                    pos += n;
                    if pos == len {
                        break;
                    }
                }
            }
            IoType::Write => {
                let mut pos = 0usize;
                for seg in io.segments() {
                    let n = seg.len().min(len - pos);
                    // SAFETY: as for reads, in the other direction.
                    unsafe {
                        std::ptr::copy_nonoverlapping(seg.as_ptr(), self.base.add(off + pos), n)
                    };
                    pos += n;
                    if pos == len {
                        break;
                    }
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                self.mem.zero_range(off, len);
            }
            IoType::Flush => {}
        }
        io.status = IoStatus::Success;
        self.q.push(io);
        Ok(())
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.q.wait(f);
    }
}

impl Drop for MallocChannel {
    fn drop(&mut self) {
        crate::leaf::unregister(&self.poller);
        self.q.abort_all();
    }
}

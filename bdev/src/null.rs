//! The null bdev: every request succeeds on the next reactor iteration, writes
//! go nowhere and reads return zeroes (SPDK's `bdev_null_create`).
//!
//! Zeroing a read buffer costs as much as the rest of the request; SPDK's null
//! bdev leaves the caller's buffer untouched ("undefined data"). That behaviour
//! is available with [`NullOptions::zero_reads`] off, for benchmarks of the
//! I/O stack itself.

use crate::bdev::{Bdev, Channel};
use crate::error::BdevError;
use crate::io::{BdevIo, IoStatus, IoType};
use crate::leaf::{check_geometry, uuid_or_random, LocalQueue};
use reactor::PollerHandle;
use serde_json::{json, Value};
use std::any::Any;
use std::rc::Rc;
use std::sync::Arc;

/// Behaviour switches of a null bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullOptions {
    /// Reads fill the caller's buffers with zeroes (default). Off: buffers are
    /// left as they are (SPDK's behaviour).
    pub zero_reads: bool,
}

impl Default for NullOptions {
    fn default() -> Self {
        Self { zero_reads: true }
    }
}

/// A bdev that stores nothing.
pub struct NullBdev {
    name: String,
    num_blocks: std::sync::atomic::AtomicU64,
    block_size: u32,
    uuid: String,
    opts: NullOptions,
}

impl NullBdev {
    /// A null bdev of `num_blocks` blocks of `block_size` bytes whose reads
    /// return zeroes. The caller registers it (see [`crate::registry`]).
    pub fn new(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<String>,
    ) -> Result<Arc<NullBdev>, BdevError> {
        Self::with_options(name, num_blocks, block_size, uuid, NullOptions::default())
    }

    /// Like [`NullBdev::new`] with explicit options.
    pub fn with_options(
        name: &str,
        num_blocks: u64,
        block_size: u32,
        uuid: Option<String>,
        opts: NullOptions,
    ) -> Result<Arc<NullBdev>, BdevError> {
        check_geometry(name, num_blocks, block_size)?;
        let uuid = uuid_or_random(uuid)?;
        Ok(Arc::new(NullBdev {
            name: name.to_string(),
            num_blocks: std::sync::atomic::AtomicU64::new(num_blocks),
            block_size,
            uuid,
            opts,
        }))
    }

    /// The options it was created with.
    pub fn options(&self) -> NullOptions {
        self.opts
    }

    /// SPDK's `bdev_null_resize`: grows to `bytes` (whole blocks); a smaller
    /// size is refused, as SPDK refuses it. (QEMU's `null-co` cannot resize:
    /// [`Bdev::resize`] stays `None`.) Callers refresh the reactors'
    /// channels ([`crate::refresh_channel_sizes`]).
    pub fn grow_to(&self, bytes: u64) -> Result<(), BdevError> {
        let blocks = bytes / self.block_size as u64;
        if blocks < self.num_blocks() {
            return Err(BdevError::InvalidParam(
                "The new bdev size must not be smaller than current bdev size".into(),
            ));
        }
        self.num_blocks
            .store(blocks, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Bdev for NullBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Null disk"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        crate::leaf::io_type_supported(t)
    }
    fn uuid(&self) -> Option<String> {
        Some(self.uuid.clone())
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let (q, poller) = LocalQueue::start(&format!("bdev_null_{}", self.name));
        Ok(Box::new(NullChannel {
            q,
            poller,
            zero_reads: self.opts.zero_reads,
        }))
    }
    fn config(&self) -> Option<Value> {
        let mut params = json!({
            "name": self.name,
            "num_blocks": self.num_blocks(),
            "block_size": self.block_size,
            "uuid": self.uuid,
        });
        if !self.opts.zero_reads {
            params["zero_reads"] = json!(false);
        }
        Some(json!({ "method": "bdev_null_create", "params": params }))
    }
    fn driver_specific(&self) -> Value {
        json!({ "null": { "zero_reads": self.opts.zero_reads } })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct NullChannel {
    q: Rc<LocalQueue>,
    poller: PollerHandle,
    zero_reads: bool,
}

impl Channel for NullChannel {
    #[inline]
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if !self.q.has_room() {
            return Err(io);
        }
        if io.io_type == IoType::Read && self.zero_reads {
            zero_read(&mut io);
        }
        io.status = IoStatus::Success;
        self.q.push(io);
        Ok(())
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.q.wait(f);
    }
}

/// Whether `b` is all zeroes.
#[inline]
fn is_zero(b: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { is_zero_avx2(b) };
        }
    }
    is_zero_generic(b)
}

/// AVX2 version: 128 bytes per step, early exit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn is_zero_avx2(b: &[u8]) -> bool {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_or_si256, _mm256_testz_si256};
    let mut chunks = b.chunks_exact(128);
    for c in &mut chunks {
        let p = c.as_ptr() as *const __m256i;
        // SAFETY: `c` is 128 readable bytes; unaligned loads are allowed.
        let (a, b2, c2, d) = unsafe {
            (
                _mm256_loadu_si256(p),
                _mm256_loadu_si256(p.add(1)),
                _mm256_loadu_si256(p.add(2)),
                _mm256_loadu_si256(p.add(3)),
            )
        };
        let o = _mm256_or_si256(_mm256_or_si256(a, b2), _mm256_or_si256(c2, d));
        if _mm256_testz_si256(o, o) == 0 {
            return false;
        }
    }
    is_zero_generic(chunks.remainder())
}

/// Portable version (64-byte blocks, vectorisable, early exit).
#[inline]
fn is_zero_generic(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for c in &mut blocks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// Makes the request's memory read as zeroes. Memory that is zero already is
/// only read, not written: a benchmark's reused read buffers stay clean in the
/// cache instead of being rewritten on every request.
#[inline]
fn zero_read(io: &mut BdevIo) {
    let mut left = io.len as usize;
    for seg in io.segments_mut() {
        if left == 0 {
            break;
        }
        let n = seg.len().min(left);
        let seg = &mut seg[..n];
        if !is_zero(seg) {
            seg.fill(0);
        }
        left -= n;
    }
}

impl Drop for NullChannel {
    fn drop(&mut self) {
        crate::leaf::unregister(&self.poller);
        self.q.abort_all();
    }
}

//! The pipelined copier the stream and the intermediate commit share (the
//! mirror and the active commit run on `drivers/mirror/core.rs`).
//!
//! A job that copies describes its source and target by [`CopyOps`]: how big
//! the range is, its granularity, what each extent holds (walked through the
//! chain, whole regions at once) and how one chunk is copied. [`copy_all`]
//! then walks `[0, size)` on the job's reactor and:
//!
//! - skips what need not be copied, splits what must into aligned chunks of
//!   at most [`Tuning::chunk`] bytes and copies up to [`Tuning::max_inflight`]
//!   of them at once, each as its own local task, and no more than its fair
//!   share of its reactor's budget ([`Tuning::reactor_inflight`] divided
//!   among the copies on that reactor that have chunks to start; `share.rs`);
//! - shrinks the window (and with it the chunk size, down to one granule)
//!   while clients are busy ([`CopyOps::client_ops`] moved since the last
//!   sample) and grows it back by one per idle sample (AIMD, `window.rs`);
//! - takes every chunk's bytes from the job's speed limit before starting it;
//!   and, with `x-throttle-group`, reserves them in that throttle group
//!   (shared with other jobs and devices) and waits for its turn;
//! - applies the job's `on-error` policy to each failed extent query or
//!   chunk: report ends the copy with the error, ignore goes on (the job
//!   still fails at the end), stop pauses the job and retries the chunk
//!   after `job-resume`;
//! - reports progress as the end of the contiguous done prefix of the walk
//!   (copied, skipped, or failed and ignored; `prefix.rs`): chunks that
//!   complete beyond one still in flight or failed are counted once it is
//!   done, so the offset on an error means what QEMU's sequential copy
//!   means by it: everything before it is done;
//! - stops at pause points with nothing in flight (pause, cancel, error);
//!   before a pause it lets the target settle ([`CopyOps::settle`]: the
//!   stream and the commit flush it), so the offset a paused job reports is
//!   on the disk with its metadata, what a crash would keep: an image's new
//!   L2 entries otherwise wait in its cache for the next flush, which a job
//!   paused on a full disk could wait for indefinitely.
//!
//! Returns `Ok` when everything was copied, the error (the first errno's
//! text, as QEMU reports it) when an error was reported or ignored, and
//! `Ok` on cancel (the caller asks the job).

mod bufpool;
mod pipeline;
mod prefix;
mod read;
mod share;
mod window;

pub use bufpool::BufPool;
pub use pipeline::copy_all;
pub use prefix::Prefix;
pub use read::read_chunk;
pub use share::{fair_share, Share};
pub use window::Window;

use crate::job::IoOperation;
use std::future::Future;
use std::time::Duration;

/// How the copier works. The defaults come from `scripts/bench/stream.sh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Largest chunk (rounded to whole granules).
    pub chunk: u64,
    /// Chunks in flight while clients are idle.
    pub max_inflight: usize,
    /// Chunks in flight for all the copies on one reactor together, shared
    /// fairly among them (one copy alone still has `max_inflight`).
    pub reactor_inflight: usize,
    /// Start with one chunk in flight and add one per chunk ended, up to the
    /// share (`share.rs`).
    pub slow_start: bool,
    /// Lower the in-flight count while clients use the device.
    pub yield_to_clients: bool,
    /// How often client activity is sampled.
    pub sample: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            chunk: 2 << 20,
            max_inflight: 8,
            reactor_inflight: 16,
            slow_start: true,
            yield_to_clients: true,
            sample: Duration::from_millis(5),
        }
    }
}

impl Tuning {
    /// The defaults, with `SLUICE_STREAM_CHUNK_KB`, `SLUICE_STREAM_INFLIGHT`,
    /// `SLUICE_STREAM_REACTOR_INFLIGHT`, `SLUICE_STREAM_SLOW_START=0` and
    /// `SLUICE_STREAM_YIELD=0` from `env` (benchmarks). Read once, at start-up, by the service.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Self {
        let mut t = Tuning::default();
        let num = |k: &str| env(k).and_then(|v| v.parse::<u64>().ok());
        if let Some(kb) = num("SLUICE_STREAM_CHUNK_KB") {
            t.chunk = kb.max(4) << 10;
        }
        if let Some(n) = num("SLUICE_STREAM_INFLIGHT") {
            t.max_inflight = n.clamp(1, 1024) as usize;
        }
        if let Some(n) = num("SLUICE_STREAM_REACTOR_INFLIGHT") {
            t.reactor_inflight = n.clamp(1, 65536) as usize;
        }
        if num("SLUICE_STREAM_YIELD") == Some(0) {
            t.yield_to_clients = false;
        }
        if num("SLUICE_STREAM_SLOW_START") == Some(0) {
            t.slow_start = false;
        }
        t
    }
}

/// What the walk found at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the queried offset over which this holds (> 0).
    pub len: u64,
    /// Must be copied.
    pub copy: bool,
    /// Reads as zeroes (a chunk wholly inside may be written as zeroes).
    pub zero: bool,
}

/// A granule-aligned range to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Start (aligned).
    pub offset: u64,
    /// Length (whole granules but at the end).
    pub len: u64,
    /// The source reads zeroes here: write zeroes without reading.
    pub zero: bool,
    /// Bytes of job progress this chunk accounts for (from where the walk
    /// was, which may be inside the first granule, to the chunk's end).
    pub progress: u64,
}

/// A failed chunk or extent query: which side failed, with which errno
/// (positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyError {
    /// Read (source) or write (target).
    pub op: IoOperation,
    /// Positive errno.
    pub errno: i32,
}

/// A copy's source and target, as the copier sees them. Its futures run on
/// the job's reactor; they are returned unboxed (the copier is generic over
/// its ops), so a chunk costs no allocation beyond its task.
pub trait CopyOps: 'static {
    /// Bytes to walk, from 0.
    fn size(&self) -> u64;
    /// Chunk alignment (the target's cluster size); at least 512.
    fn granularity(&self) -> u64;
    /// What the range from `offset` (at most `len` bytes) holds. An error's
    /// errno is positive.
    fn extent(&self, offset: u64, len: u64) -> impl Future<Output = Result<Extent, i32>>;
    /// Copies one chunk.
    fn copy(&self, c: Chunk) -> impl Future<Output = Result<(), CopyError>>;
    /// A counter of client requests on the device the job shares (monotonic),
    /// or `None`: no clients to yield to.
    fn client_ops(&self) -> Option<u64> {
        None
    }
    /// Makes what the chunks copied so far wrote reach the target's disk,
    /// metadata included (the copier is about to pause with nothing in
    /// flight). Best effort: a failure (a full disk) is the next chunk's to
    /// report. The default does nothing.
    fn settle(&self) -> impl Future<Output = ()> {
        async {}
    }
}

/// Flushes `ch` (a copy's target) for [`CopyOps::settle`]; a failure is
/// logged, not returned.
pub async fn settle_flush(ch: &bdev::IoChannel) {
    let io = bdev::submit_wait(ch, bdev::BdevIo::new(bdev::IoType::Flush, 0, 0, None, None)).await;
    if !io.status.is_ok() {
        tracing::debug!(status = ?io.status, "flush of a copy's target before a pause failed");
    }
}

/// The C library's text for an errno (what QEMU puts in `error`).
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno.abs()).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_from_env_parses_clamps_and_ignores_junk() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Tuning::from_env(env(&[])), Tuning::default());
        let t = Tuning::from_env(env(&[
            ("SLUICE_STREAM_CHUNK_KB", "1"),
            ("SLUICE_STREAM_INFLIGHT", "5000"),
            ("SLUICE_STREAM_REACTOR_INFLIGHT", "0"),
            ("SLUICE_STREAM_SLOW_START", "0"),
            ("SLUICE_STREAM_YIELD", "0"),
        ]));
        assert!(!t.slow_start);
        assert_eq!(
            (
                t.chunk,
                t.max_inflight,
                t.reactor_inflight,
                t.yield_to_clients
            ),
            (4 << 10, 1024, 1, false)
        );
        let t = Tuning::from_env(env(&[
            ("SLUICE_STREAM_CHUNK_KB", "x"),
            ("SLUICE_STREAM_INFLIGHT", "0"),
            ("SLUICE_STREAM_REACTOR_INFLIGHT", "64"),
            ("SLUICE_STREAM_YIELD", "1"),
        ]));
        assert_eq!(
            (
                t.chunk,
                t.max_inflight,
                t.reactor_inflight,
                t.yield_to_clients
            ),
            (2 << 20, 1, 64, true)
        );
    }
}

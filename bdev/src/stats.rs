//! Per-channel I/O statistics, summed over reactors for `bdev_get_iostat`.

use crate::io::{BdevIo, IoType};
use serde::Serialize;
use std::cell::Cell;

#[derive(Default)]
struct TypeStats {
    ops: Cell<u64>,
    bytes: Cell<u64>,
    lat_sum: Cell<u64>,
    lat_min: Cell<u64>,
    lat_max: Cell<u64>,
}

impl TypeStats {
    #[inline]
    fn record(&self, bytes: u64, lat: u64) {
        let ops = self.ops.get();
        self.ops.set(ops + 1);
        self.bytes.set(self.bytes.get() + bytes);
        self.lat_sum.set(self.lat_sum.get() + lat);
        if ops == 0 || lat < self.lat_min.get() {
            self.lat_min.set(lat);
        }
        if lat > self.lat_max.get() {
            self.lat_max.set(lat);
        }
    }
}

/// Counters of one bdev on one reactor (no atomics: only that reactor writes them).
#[derive(Default)]
pub struct IoStats {
    read: TypeStats,
    write: TypeStats,
    unmap: TypeStats,
    flush: TypeStats,
    write_zeroes: TypeStats,
    errors: Cell<u64>,
}

/// A summable snapshot in SPDK's `bdev_get_iostat` vocabulary (latencies in ticks).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IoStatsSnapshot {
    pub bytes_read: u64,
    pub num_read_ops: u64,
    pub bytes_written: u64,
    pub num_write_ops: u64,
    pub bytes_unmapped: u64,
    pub num_unmap_ops: u64,
    pub num_flush_ops: u64,
    pub bytes_write_zeroes: u64,
    pub num_write_zeroes_ops: u64,
    pub read_latency_ticks: u64,
    pub max_read_latency_ticks: u64,
    pub min_read_latency_ticks: u64,
    pub write_latency_ticks: u64,
    pub max_write_latency_ticks: u64,
    pub min_write_latency_ticks: u64,
    pub unmap_latency_ticks: u64,
    pub max_unmap_latency_ticks: u64,
    pub min_unmap_latency_ticks: u64,
    pub num_io_errors: u64,
}

impl IoStats {
    /// Records a request completed at tick `now`.
    #[inline]
    pub(crate) fn record_at(&self, io: &BdevIo, now: u64) {
        if !io.status.is_ok() {
            self.errors.set(self.errors.get() + 1);
            return;
        }
        let lat = now.saturating_sub(io.submit_tick);
        let t = match io.io_type {
            IoType::Read => &self.read,
            IoType::Write => &self.write,
            IoType::Unmap => &self.unmap,
            IoType::Flush => &self.flush,
            IoType::WriteZeroes => &self.write_zeroes,
        };
        t.record(io.len, lat);
    }

    /// The current counters.
    pub fn snapshot(&self) -> IoStatsSnapshot {
        IoStatsSnapshot {
            bytes_read: self.read.bytes.get(),
            num_read_ops: self.read.ops.get(),
            bytes_written: self.write.bytes.get(),
            num_write_ops: self.write.ops.get(),
            bytes_unmapped: self.unmap.bytes.get(),
            num_unmap_ops: self.unmap.ops.get(),
            num_flush_ops: self.flush.ops.get(),
            bytes_write_zeroes: self.write_zeroes.bytes.get(),
            num_write_zeroes_ops: self.write_zeroes.ops.get(),
            read_latency_ticks: self.read.lat_sum.get(),
            max_read_latency_ticks: self.read.lat_max.get(),
            min_read_latency_ticks: self.read.lat_min.get(),
            write_latency_ticks: self.write.lat_sum.get(),
            max_write_latency_ticks: self.write.lat_max.get(),
            min_write_latency_ticks: self.write.lat_min.get(),
            unmap_latency_ticks: self.unmap.lat_sum.get(),
            max_unmap_latency_ticks: self.unmap.lat_max.get(),
            min_unmap_latency_ticks: self.unmap.lat_min.get(),
            num_io_errors: self.errors.get(),
        }
    }
}

impl IoStatsSnapshot {
    /// Adds another reactor's counters.
    pub fn add(&mut self, o: &IoStatsSnapshot) {
        fn min_nz(a: u64, b: u64) -> u64 {
            match (a, b) {
                (0, x) | (x, 0) => x,
                (a, b) => a.min(b),
            }
        }
        self.bytes_read += o.bytes_read;
        self.num_read_ops += o.num_read_ops;
        self.bytes_written += o.bytes_written;
        self.num_write_ops += o.num_write_ops;
        self.bytes_unmapped += o.bytes_unmapped;
        self.num_unmap_ops += o.num_unmap_ops;
        self.num_flush_ops += o.num_flush_ops;
        self.bytes_write_zeroes += o.bytes_write_zeroes;
        self.num_write_zeroes_ops += o.num_write_zeroes_ops;
        self.read_latency_ticks += o.read_latency_ticks;
        self.max_read_latency_ticks = self.max_read_latency_ticks.max(o.max_read_latency_ticks);
        self.min_read_latency_ticks = min_nz(self.min_read_latency_ticks, o.min_read_latency_ticks);
        self.write_latency_ticks += o.write_latency_ticks;
        self.max_write_latency_ticks = self.max_write_latency_ticks.max(o.max_write_latency_ticks);
        self.min_write_latency_ticks =
            min_nz(self.min_write_latency_ticks, o.min_write_latency_ticks);
        self.unmap_latency_ticks += o.unmap_latency_ticks;
        self.max_unmap_latency_ticks = self.max_unmap_latency_ticks.max(o.max_unmap_latency_ticks);
        self.min_unmap_latency_ticks =
            min_nz(self.min_unmap_latency_ticks, o.min_unmap_latency_ticks);
        self.num_io_errors += o.num_io_errors;
    }
}

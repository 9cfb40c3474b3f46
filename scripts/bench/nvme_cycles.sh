#!/usr/bin/env bash
# CPU cost per I/O of sluice's NVMe queue pair (submit + complete), measured
# against the in-memory software controller: the figure that counts for the
# driver (SPDK budgets about 400 cycles per I/O). IOPS inside the TCG guest
# (scripts/vm) are bound by the emulation and are no performance figure.
# No peer can run here: there is no NVMe device, and QEMU's and SPDK's NVMe
# drivers need one (or VFIO); SPDK's budget of about 400 cycles per I/O is a
# reference figure quoted with issue 8, not a measurement. No file I/O (no cache to drop); each
# completion's status is checked (the bench panics on a failed I/O). Prints
# TSC ticks per I/O, no ratio: there is nothing beside it to divide by.
# Usage: scripts/bench/nvme_cycles.sh [IOS] [BATCH] [SIZE]
# NVME_BENCH: the example binary (default: cargo build it).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${NVME_BENCH:-}" ]; then
    cargo build --release -q -p bdev --example nvme_queue_bench
    NVME_BENCH=target/release/examples/nvme_queue_bench
fi
for b in ${BATCHES:-1 8 32}; do
    "$NVME_BENCH" "${1:-2000000}" "${2:-$b}" "${3:-4096}"
done

#!/usr/bin/env bash
# CPU cost per I/O of sluice's NVMe queue pair (submit + complete), measured
# against the in-memory software controller: the figure that counts for the
# driver (SPDK budgets about 400 cycles per I/O). IOPS inside the TCG guest
# (scripts/vm) are bound by the emulation and are no performance figure.
# Usage: scripts/bench/nvme_cycles.sh [IOS] [BATCH] [SIZE]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p bdev --example nvme_queue_bench
for b in ${BATCHES:-1 8 32}; do
    target/release/examples/nvme_queue_bench "${1:-2000000}" "${2:-$b}" "${3:-4096}"
done

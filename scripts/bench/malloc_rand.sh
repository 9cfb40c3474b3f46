#!/usr/bin/env bash
# Malloc bdev, 4 KiB random reads and writes at QD 32 on one core: sluice perf
# vs a memcpy-bound peer in the same run (fio's mmap engine on a file in
# /dev/shm: every I/O is a 4 KiB copy from or to RAM), median of $RUNS each.
# Reference: SPDK bdevperf does 740K (randread) and 700K (randwrite) IOPS on its
# malloc bdev on this machine kind; the goal is at least that.
#
# Env: T=seconds per run (5), RUNS (3), CORE (last core), SIZE_MIB (1024).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${T:-5}; RUNS=${RUNS:-3}; SIZE_MIB=${SIZE_MIB:-1024}
CORE=${CORE:-$(( $(nproc) - 1 ))}
MASK=$(printf '0x%x' $((1 << CORE)))
command -v fio >/dev/null || { apt-get install -y fio >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y fio >/dev/null; }; }
cargo build --release -q -p sluice --bin sluice
SLUICE=${SLUICE:-target/release/sluice}
SHM=/dev/shm/sluice-bench-malloc.$$
trap 'rm -f "$SHM"' EXIT
fio --name=fill --filename="$SHM" --size="${SIZE_MIB}m" --rw=write --bs=1m --ioengine=psync >/dev/null 2>&1

median() { python3 -c 'import sys,statistics; print(round(statistics.median(float(x) for x in sys.argv[1:])))' "$@"; }
sluice_iops() { RUST_LOG=error "$SLUICE" perf --malloc "Malloc0:$SIZE_MIB:4096" -q 32 -o 4k -w "$1" -t "$T" -m "$MASK" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["iops"])'; }
fio_iops() { fio --name=mem --filename="$SHM" --size="${SIZE_MIB}m" --ioengine=mmap --rw="$1" --bs=4k --iodepth=1 \
    --time_based --runtime="$T" --cpus_allowed="$CORE" --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["iops"] + j["write"]["iops"])'; }

for W in randread randwrite; do
    s=(); f=()
    for _ in $(seq "$RUNS"); do f+=("$(fio_iops "$W")"); s+=("$(sluice_iops "$W")"); done
    S=$(median "${s[@]}"); F=$(median "${f[@]}")
    python3 - "$W" "$S" "$F" <<'PY'
import sys
w, s, f = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
spdk = {"randread": 740e3, "randwrite": 700e3}[w]
print(f"malloc 4KiB {w} QD32, 1 core: sluice {s/1e3:.0f}K IOPS; fio mmap on /dev/shm {f/1e3:.0f}K IOPS; "
      f"ratio {s/f:.2f}; vs SPDK bdevperf reference {spdk/1e3:.0f}K: {s/spdk:.2f}")
PY
done

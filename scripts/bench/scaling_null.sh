#!/usr/bin/env bash
# Reactor scaling: null bdevs, 4 KiB random reads at QD 128 per job, one
# reactor vs two (one job per reactor per bdev), alternately in the same run
# (median of $RUNS each), with the ratio. Goal: two reactors >= 1.8x one.
#
# Env: T=seconds per run (5), RUNS (3), CORES ("0 1": the two cores to use),
#      NOZERO (set: leave read buffers untouched, as SPDK's null bdev does).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${T:-5}; RUNS=${RUNS:-3}; read -r C0 C1 <<<"${CORES:-0 1}"
SUFFIX=${NOZERO:+:nozero}
cargo build --release -q -p rpc --bin sluice
SLUICE=${SLUICE:-target/release/sluice}
ONE=$(printf '0x%x' $((1 << C0))); TWO=$(printf '0x%x' $(((1 << C0) | (1 << C1))))

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
run() { RUST_LOG=error "$SLUICE" perf --null "Null0:1024:512$SUFFIX" -q 128 -o 4k -w randread -t "$T" -m "$1" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["iops"])'; }

one=(); two=()
for _ in $(seq "$RUNS"); do one+=("$(run "$ONE")"); two+=("$(run "$TWO")"); done
python3 - "$(median "${one[@]}")" "$(median "${two[@]}")" "$ONE" "$TWO" <<'PY'
import sys
a, b = float(sys.argv[1]), float(sys.argv[2])
print(f"null 4KiB randread QD128 per reactor: 1 reactor ({sys.argv[3]}) {a/1e6:.2f}M IOPS, "
      f"2 reactors ({sys.argv[4]}) {b/1e6:.2f}M IOPS; scaling {b/a:.2f}x (goal >= 1.8x)")
PY

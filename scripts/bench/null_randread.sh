#!/usr/bin/env bash
# Null bdev, 4 KiB random reads, one core: sluice perf vs fio's null engine,
# measured alternately in the same run (median of $RUNS each), with the ratio.
# Reference: SPDK bdevperf on its null bdev does 11.3M IOPS at QD 128 (10.4M at
# QD 32) on one core of this machine kind; fio's null engine 1.9M. Floor: 8M.
#
# sluice is measured twice: with reads zero-filled (sluice's null bdev default)
# and with read buffers left untouched (":nozero", what SPDK's null bdev does).
#
# Env: T=seconds per run (5), RUNS (3), CORE (last core), QDS ("128 32").
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${T:-5}; RUNS=${RUNS:-3}; QDS=${QDS:-"128 32"}
CORE=${CORE:-$(( $(nproc) - 1 ))}
MASK=$(printf '0x%x' $((1 << CORE)))
command -v fio >/dev/null || { apt-get install -y fio >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y fio >/dev/null; }; }
cargo build --release -q -p sluice --bin sluice
SLUICE=${SLUICE:-target/release/sluice}

median() { python3 -c 'import sys,statistics; print(round(statistics.median(float(x) for x in sys.argv[1:])))' "$@"; }
sluice_iops() { RUST_LOG=error "$SLUICE" perf --null "Null0:1024:512$1" -q "$2" -o 4k -w randread -t "$T" -m "$MASK" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["iops"])'; }
fio_iops() { fio --name=null --ioengine=null --rw=randread --bs=4k --size=1g --iodepth="$1" --time_based --runtime="$T" \
    --cpus_allowed="$CORE" --output-format=json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])'; }

for QD in $QDS; do
    s=(); n=(); f=()
    for _ in $(seq "$RUNS"); do
        f+=("$(fio_iops "$QD")"); s+=("$(sluice_iops "" "$QD")"); n+=("$(sluice_iops ":nozero" "$QD")")
    done
    S=$(median "${s[@]}"); N=$(median "${n[@]}"); F=$(median "${f[@]}")
    python3 - "$QD" "$S" "$N" "$F" <<'PY'
import sys
qd, s, n, f = int(sys.argv[1]), *map(float, sys.argv[2:])
spdk = 11.3e6 if qd == 128 else 10.4e6 if qd == 32 else None
print(f"null 4KiB randread QD{qd}, 1 core: sluice {s/1e6:.2f}M IOPS (zero-filled reads), "
      f"{n/1e6:.2f}M IOPS (untouched buffers, as SPDK); fio null {f/1e6:.2f}M IOPS")
print(f"  ratio sluice/fio: {s/f:.2f} (zero-filled), {n/f:.2f} (untouched); "
      f"SPDK bdevperf/fio on this machine kind: {11.3/1.9:.2f}")
if spdk:
    print(f"  scaled to fio's 1.9M reference figure: sluice {s/f*1.9:.2f}M (zero-filled), {n/f*1.9:.2f}M (untouched) "
          f"vs SPDK bdevperf {spdk/1e6:.1f}M; floor 8M")
PY
done

#!/usr/bin/env bash
# uring bdev vs fio's io_uring engine on the same file, O_DIRECT, 4 KiB random
# reads at QD 1 and QD 32, one core each, alternately in the same run (median of
# $RUNS each), with the ratio. Both use registered files and buffers. Goal: >= 1.0.
#
# Env: FILE (/var/tmp/sluice-bench-uring.img, created and filled once),
#      SIZE (4G), T=seconds per run (5), RUNS (3), CORE (last core), QDS ("1 32").
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${T:-5}; RUNS=${RUNS:-3}; QDS=${QDS:-"1 32"}; SIZE=${SIZE:-4G}
FILE=${FILE:-/var/tmp/sluice-bench-uring.img}
CORE=${CORE:-$(( $(nproc) - 1 ))}
MASK=$(printf '0x%x' $((1 << CORE)))
command -v fio >/dev/null || { apt-get install -y fio >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y fio >/dev/null; }; }
cargo build --release -q -p sluice --bin sluice
SLUICE=${SLUICE:-target/release/sluice}
BYTES=$(numfmt --from=iec "$SIZE")
if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" != "$BYTES" ]; then
    echo "filling $FILE ($SIZE) with data..."
    rm -f "$FILE"
    fio --name=fill --filename="$FILE" --size="$SIZE" --rw=write --bs=1m --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
fi

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
sluice_run() { RUST_LOG=error "$SLUICE" perf --file "Uring0=$FILE" -q "$1" -o 4k -w randread -t "$T" -m "$MASK" --json \
    | python3 -c 'import json,sys; t=json.load(sys.stdin)["total"]; print(t["iops"], t["avg_latency_us"])'; }
fio_run() { fio --name=uring --filename="$FILE" --size="$SIZE" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
    --iodepth="$1" --fixedbufs=1 --registerfiles=1 --time_based --runtime="$T" --cpus_allowed="$CORE" --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print(r["iops"], r["lat_ns"]["mean"]/1000)'; }

for QD in $QDS; do
    si=(); sl=(); fi_=(); fl=()
    for _ in $(seq "$RUNS"); do
        read -r a b < <(fio_run "$QD"); fi_+=("$a"); fl+=("$b")
        read -r a b < <(sluice_run "$QD"); si+=("$a"); sl+=("$b")
    done
    python3 - "$QD" "$(median "${si[@]}")" "$(median "${sl[@]}")" "$(median "${fi_[@]}")" "$(median "${fl[@]}")" <<'PY'
import sys
qd = sys.argv[1]; si, sl, fi, fl = map(float, sys.argv[2:])
print(f"uring 4KiB randread O_DIRECT QD{qd}, 1 core: sluice {si/1e3:.1f}K IOPS (avg {sl:.1f} us); "
      f"fio io_uring {fi/1e3:.1f}K IOPS (avg {fl:.1f} us); ratio {si/fi:.2f}")
PY
done

#!/usr/bin/env bash
# Null bdev, 4 KiB random reads, one core: sluice perf against, in the same
# run, fio's null engine and QEMU's block layer on its null driver
# (`qemu-img bench` on null-co, in-process, the same queue depth; a fixed
# stride, it has no random mode; null-co has no aio setting, so its defaults
# are its best), who goes first rotating per run, median of $RUNS each, with
# the ratios. sluice is measured twice: with reads zero-filled (sluice's null
# bdev default; null-co with read-zeroes=on beside it) and with read buffers
# left untouched (":nozero", what SPDK's null bdev does; null-co with
# read-zeroes=off). A null device holds no data: nothing to check, and no
# file, so no cache to drop.
# Reference, not measured here (SPDK cannot run on this machine): SPDK bdevperf
# on its null bdev did 11.3M IOPS at QD 128 (10.4M at QD 32) on one core of
# this machine kind, with fio's null engine at 1.9M: the figures quoted in
# issue 3. Floor: 8M.
#
# Env: T=seconds per run (5), RUNS (3), CORE (last core), QDS ("128 32"),
#      COUNT (requests per qemu-img bench run, 2000000), SLUICE (default: build).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source scripts/bench/lib.sh
T=${T:-5}; RUNS=${RUNS:-3}; QDS=${QDS:-"128 32"}; COUNT=${COUNT:-2000000}
CORE=${CORE:-$(( $(nproc) - 1 ))}
MASK=$(printf '0x%x' $((1 << CORE)))
command -v fio >/dev/null || { echo "needs fio" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -q -p sluice --bin sluice
    SLUICE=target/release/sluice
fi

sluice_iops() { RUST_LOG=error "$SLUICE" perf --null "Null0:1024:512$1" -q "$2" -o 4k -w randread -t "$T" -m "$MASK" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["iops"])'; }
fio_iops() { fio --name=null --ioengine=null --rw=randread --bs=4k --size=1g --iodepth="$1" --time_based --runtime="$T" \
    --cpus_allowed="$CORE" --output-format=json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])'; }
qemu_iops() { # QD READ_ZEROES
    local out
    out=$(taskset -c "$CORE" qemu-img bench --image-opts -d "$1" -s 4096 -c "$COUNT" -S $((4096 * 16411)) \
        "driver=null-co,size=1073741824,read-zeroes=$2" 2>&1) || { echo "qemu-img bench failed: $out" >&2; exit 1; }
    python3 -c 'import re,sys; t=float(re.search(r"completed in ([0-9.]+)", sys.argv[2]).group(1)); print(int(sys.argv[1])/t)' "$COUNT" "$out"
}

echo "load: $(loadavg)"
for QD in $QDS; do
    declare -A V=([s]="" [n]="" [f]="" [qz]="" [qn]="")
    for r in $(seq 0 $((RUNS - 1))); do
        for side in $(rotate "$r" s n f qz qn); do
            case $side in
                s) V[s]+=" $(sluice_iops "" "$QD")" ;;
                n) V[n]+=" $(sluice_iops ":nozero" "$QD")" ;;
                f) V[f]+=" $(fio_iops "$QD")" ;;
                qz) V[qz]+=" $(qemu_iops "$QD" on)" ;;
                qn) V[qn]+=" $(qemu_iops "$QD" off)" ;;
            esac
        done
    done
    # shellcheck disable=SC2086
    python3 - "$QD" "$(median ${V[s]})" "$(median ${V[n]})" "$(median ${V[f]})" "$(median ${V[qz]})" "$(median ${V[qn]})" <<'PY'
import sys
qd, s, n, f, qz, qn = int(sys.argv[1]), *map(float, sys.argv[2:])
spdk = 11.3e6 if qd == 128 else 10.4e6 if qd == 32 else None
print(f"null 4KiB randread QD{qd}, 1 core: sluice {s/1e6:.2f}M IOPS (zero-filled reads), "
      f"{n/1e6:.2f}M IOPS (untouched buffers, as SPDK); fio null {f/1e6:.2f}M IOPS; "
      f"qemu-img bench null-co {qz/1e6:.2f}M (read-zeroes=on), {qn/1e6:.2f}M (off)")
print(f"  ratio sluice/fio: {s/f:.2f} (zero-filled), {n/f:.2f} (untouched); "
      f"sluice/qemu null-co: {s/qz:.2f} (zero-filled), {n/qn:.2f} (untouched)")
if spdk:
    print(f"  reference figures (issue 3, not measured here): SPDK bdevperf {spdk/1e6:.1f}M with fio null at 1.9M "
          f"(SPDK/fio {11.3/1.9:.2f}); sluice scaled to that fio: {s/f*1.9:.2f}M (zero-filled), "
          f"{n/f*1.9:.2f}M (untouched); floor 8M")
PY
done

#!/usr/bin/env bash
# uring bdev against fio's io_uring engine on the same file, O_DIRECT, 4 KiB
# random reads at QD 1 and QD 32, one core each, with QEMU's block layer on the
# same file beside them (`qemu-img bench -t none`, its default aio=threads and
# io_uring; it has no random mode: a fixed stride of 16411 blocks). Who goes
# first rotates per run, caches are dropped before each (O_DIRECT reads skip
# the page cache, but the file's metadata does not), median of $RUNS each,
# with the ratios. sluice and fio use registered files and buffers. Before any
# time counts, sluice passes a `perf -w verify` run on the file (it writes
# patterns into the fill data, which the reads do not care about).
# Goal: >= 1.0 against fio.
#
# Env: FILE (/var/tmp/sluice-bench-uring.img, created and filled once),
#      SIZE (4G), T=seconds per run (5), RUNS (3), CORE (last core), QDS ("1 32"),
#      COUNT (requests per qemu-img bench run at QD 32; QD 1 runs a tenth), SLUICE.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source scripts/bench/lib.sh
T=${T:-5}; RUNS=${RUNS:-3}; QDS=${QDS:-"1 32"}; SIZE=${SIZE:-4G}; COUNT=${COUNT:-100000}
FILE=${FILE:-/var/tmp/sluice-bench-uring.img}
CORE=${CORE:-$(( $(nproc) - 1 ))}
MASK=$(printf '0x%x' $((1 << CORE)))
command -v fio >/dev/null || { echo "needs fio" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -q -p sluice --bin sluice
    SLUICE=target/release/sluice
fi
BYTES=$(numfmt --from=iec "$SIZE")
if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" != "$BYTES" ]; then
    echo "filling $FILE ($SIZE) with data..."
    rm -f "$FILE"
    fio --name=fill --filename="$FILE" --size="$SIZE" --rw=write --bs=1m --direct=1 --ioengine=io_uring --iodepth=8 >/dev/null
fi
sluice_verify "$SLUICE" --file "V0=$FILE" -q 16 -m "$MASK" --length 64m

sluice_run() { RUST_LOG=error "$SLUICE" perf --file "Uring0=$FILE" -q "$1" -o 4k -w randread -t "$T" -m "$MASK" --json \
    | python3 -c 'import json,sys; t=json.load(sys.stdin)["total"]; print(t["iops"], t["avg_latency_us"])'; }
fio_run() { fio --name=uring --filename="$FILE" --size="$SIZE" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
    --iodepth="$1" --fixedbufs=1 --registerfiles=1 --time_based --runtime="$T" --cpus_allowed="$CORE" --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print(r["iops"], r["lat_ns"]["mean"]/1000)'; }
qemu_run() { # QD AIO -> "IOPS avg_us"
    local n=$COUNT out
    [ "$1" = 1 ] && n=$((COUNT / 10))
    out=$(taskset -c "$CORE" qemu-img bench -f raw -t none -i "$2" -d "$1" -s 4096 -c "$n" -S $((4096 * 16411)) "$FILE" 2>&1) ||
        { echo "qemu-img bench failed: $out" >&2; exit 1; }
    python3 -c 'import re,sys; n,qd=int(sys.argv[1]),int(sys.argv[2]); t=float(re.search(r"completed in ([0-9.]+)", sys.argv[3]).group(1)); print(n/t, t/n*qd*1e6)' "$n" "$1" "$out"
}

echo "load: $(loadavg)"
for QD in $QDS; do
    declare -A I=([s]="" [f]="" [q]="" [u]="") L=([s]="" [f]="" [q]="" [u]="")
    for r in $(seq 0 $((RUNS - 1))); do
        for side in $(rotate "$r" s f q u); do
            drop_caches
            case $side in
                s) read -r a b < <(sluice_run "$QD") ;;
                f) read -r a b < <(fio_run "$QD") ;;
                q) read -r a b < <(qemu_run "$QD" threads) ;;
                u) read -r a b < <(qemu_run "$QD" io_uring) ;;
            esac
            I[$side]+=" $a"; L[$side]+=" $b"
        done
    done
    # shellcheck disable=SC2086
    python3 - "$QD" "$(median ${I[s]})" "$(median ${L[s]})" "$(median ${I[f]})" "$(median ${L[f]})" \
        "$(median ${I[q]})" "$(median ${I[u]})" <<'PY'
import sys
qd = sys.argv[1]; si, sl, fi, fl, qi, ui = map(float, sys.argv[2:])
print(f"uring 4KiB randread O_DIRECT QD{qd}, 1 core: sluice {si/1e3:.1f}K IOPS (avg {sl:.1f} us); "
      f"fio io_uring {fi/1e3:.1f}K IOPS (avg {fl:.1f} us); ratio {si/fi:.2f}; qemu-img bench (stride) "
      f"aio=threads {qi/1e3:.1f}K ({si/qi:.2f}), io_uring {ui/1e3:.1f}K ({si/ui:.2f})")
PY
done

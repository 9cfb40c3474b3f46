#!/usr/bin/env bash
# Malloc bdev, 4 KiB random reads and writes at QD 32 on one core: sluice perf
# against, in the same run, a memcpy-bound floor (fio's mmap engine on a file
# in /dev/shm: every I/O is a 4 KiB copy from or to RAM) and QEMU's block layer
# on the same RAM (`qemu-img bench` on a raw file in /dev/shm, QD 32, with its
# default aio=threads and with io_uring; it has no random mode: a fixed stride
# of 16411 blocks). Who goes first rotates per run; median of $RUNS each.
# RAM only: no page cache stands between a run and its data, so none is
# dropped. sluice passes a `perf -w verify` run first; qemu-img bench's writes
# are read back with qemu-io (its pattern at offset 0) before its time counts.
# Reference, not measured here (SPDK cannot run on this machine): SPDK bdevperf
# did 740K (randread) and 700K (randwrite) IOPS on its malloc bdev on this
# machine kind, the figures quoted in issue 3; the goal is at least that.
#
# Env: T=seconds per run (5), RUNS (3), CORE (last core), SIZE_MIB (1024),
#      COUNT (requests per qemu-img bench run, 200000), SLUICE (default: build).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source scripts/bench/lib.sh
T=${T:-5}; RUNS=${RUNS:-3}; SIZE_MIB=${SIZE_MIB:-1024}; COUNT=${COUNT:-200000}
CORE=${CORE:-$(( $(nproc) - 1 ))}
MASK=$(printf '0x%x' $((1 << CORE)))
command -v fio >/dev/null || { echo "needs fio" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -q -p sluice --bin sluice
    SLUICE=target/release/sluice
fi
SHM=/dev/shm/sluice-bench-malloc.$$
trap 'rm -f "$SHM"' EXIT
fio --name=fill --filename="$SHM" --size="${SIZE_MIB}m" --rw=write --bs=1m --ioengine=psync >/dev/null 2>&1
sluice_verify "$SLUICE" --malloc "V0:64:4096" -q 32 -m "$MASK"

sluice_iops() { RUST_LOG=error "$SLUICE" perf --malloc "Malloc0:$SIZE_MIB:4096" -q 32 -o 4k -w "$1" -t "$T" -m "$MASK" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["iops"])'; }
fio_iops() { fio --name=mem --filename="$SHM" --size="${SIZE_MIB}m" --ioengine=mmap --rw="$1" --bs=4k --iodepth=1 \
    --time_based --runtime="$T" --cpus_allowed="$CORE" --output-format=json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["iops"] + j["write"]["iops"])'; }
qemu_iops() { # RW AIO
    local w=() out
    [ "$1" = randwrite ] && w=(-w --pattern 0xa5)
    out=$(taskset -c "$CORE" qemu-img bench -f raw -t writeback -i "$2" -d 32 -s 4096 -c "$COUNT" \
        -S $((4096 * 16411)) "${w[@]}" "$SHM" 2>&1) || { echo "qemu-img bench failed: $out" >&2; exit 1; }
    if [ "$1" = randwrite ]; then
        qemu-io -f raw -c 'read -P 0xa5 0 4k' "$SHM" | grep '^read' >/dev/null || { echo "qemu-img bench's data is not there" >&2; exit 1; }
    fi
    python3 -c 'import re,sys; t=float(re.search(r"completed in ([0-9.]+)", sys.argv[2]).group(1)); print(int(sys.argv[1])/t)' "$COUNT" "$out"
}

echo "load: $(loadavg)"
for W in randread randwrite; do
    declare -A V=([sluice]="" [fio]="" [qemu]="" [qemu_uring]="")
    for r in $(seq 0 $((RUNS - 1))); do
        for side in $(rotate "$r" sluice fio qemu qemu_uring); do
            case $side in
                sluice) V[sluice]+=" $(sluice_iops "$W")" ;;
                fio) V[fio]+=" $(fio_iops "$W")" ;;
                qemu) V[qemu]+=" $(qemu_iops "$W" threads)" ;;
                qemu_uring) V[qemu_uring]+=" $(qemu_iops "$W" io_uring)" ;;
            esac
        done
    done
    # shellcheck disable=SC2086
    python3 - "$W" "$(median ${V[sluice]})" "$(median ${V[fio]})" "$(median ${V[qemu]})" "$(median ${V[qemu_uring]})" <<'PY'
import sys
w, s, f, q, u = sys.argv[1], *map(float, sys.argv[2:])
spdk = {"randread": 740e3, "randwrite": 700e3}[w]
print(f"malloc 4KiB {w} QD32, 1 core: sluice {s/1e3:.0f}K IOPS; fio mmap on /dev/shm {f/1e3:.0f}K (ratio {s/f:.2f}); "
      f"qemu-img bench raw on /dev/shm aio=threads {q/1e3:.0f}K ({s/q:.2f}), io_uring {u/1e3:.0f}K ({s/u:.2f}); "
      f"SPDK bdevperf reference figure (issue 3, not measured here) {spdk/1e3:.0f}K: {s/spdk:.2f}")
PY
done

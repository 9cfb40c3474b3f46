#!/usr/bin/env bash
# CPU used by an idle `sluice serve` with two reactors over SECS (10) s (goal:
# < 2% of one core in total), beside an idle qemu-storage-daemon (with a QMP
# monitor and an NBD server, its defaults) sampled over the same window: both
# run at once, so neither goes first. No I/O and no data: no caches to drop,
# nothing to check. SPDK's spdk_tgt, which spins every reactor at 100%, cannot
# run here: that is a reference, not a measurement.
#   SLUICE=target/release/sluice SECS=10 scripts/bench/idle-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${SECS:-10}
if [ -z "${SLUICE:-}" ]; then
    cargo build --release --bin sluice -q
    SLUICE=./target/release/sluice
fi
dir=$(mktemp -d /tmp/sluice-idle.XXXX)
"$SLUICE" serve -m 0x3 --runtime-dir "$dir" 2>/dev/null &
pid=$!
qemu-storage-daemon --chardev "socket,id=m0,path=$dir/qsd.sock,server=on,wait=off" --monitor chardev=m0 \
    --nbd-server "addr.type=unix,addr.path=$dir/qsd-nbd.sock" >/dev/null 2>&1 &
qpid=$!
trap 'kill $pid $qpid 2>/dev/null; wait $pid $qpid 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
hz=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
s0=$(cpu $pid); q0=$(cpu $qpid)
sleep "$secs"
s1=$(cpu $pid); q1=$(cpu $qpid)
awk -v s=$((s1 - s0)) -v q=$((q1 - q0)) -v hz="$hz" -v t="$secs" -v load="$(cut -d' ' -f1-3 /proc/loadavg)" 'BEGIN {
  printf "idle over %d s (load %s): sluice serve -m 0x3 %.2f%% of one core (goal < 2%%); qemu-storage-daemon %.2f%%\n",
    t, load, s / hz / t * 100, q / hz / t * 100
  if (q > 0) printf "sluice/qsd: %.2f\n", s / q; else printf "sluice/qsd: n/a (qsd used no measurable CPU; sluice %d ticks)\n", s
}'

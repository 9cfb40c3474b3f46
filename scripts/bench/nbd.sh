#!/usr/bin/env bash
# NBD export benchmark, side by side with qemu-storage-daemon exporting the same
# data: fio's nbd engine, 4 KiB randread and randwrite at QD 32, server pinned to
# one core and fio to another. Prints IOPS of both servers and sluice/QSD.
#
#   scripts/bench/nbd.sh [ram|file|all]      (default: all)
#
# Environment: SLUICE_BIN (default target/release/sluice, built if missing),
# SERVER_CPU (0), CLIENT_CPU (1), RUNTIME (seconds per run, 10), SIZE_MB (1024),
# BENCH_DIR (a directory on a real disk for the raw file, /var/tmp).
# Needs: fio with the nbd engine (Debian: fio), qemu-storage-daemon, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHAT="${1:-all}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
RUNTIME="${RUNTIME:-10}"
SIZE_MB="${SIZE_MB:-1024}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
BIN="${SLUICE_BIN:-target/release/sluice}"

command -v fio >/dev/null || { echo "fio is missing (apt-get install fio)"; exit 1; }
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "this fio has no nbd engine"; exit 1; }
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon is missing"; exit 1; }
[ -x "$BIN" ] || cargo build --release -p sluice --bin sluice

WORK="$(mktemp -d /tmp/nbdbench.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
  rm -f "$BENCH_DIR/nbdbench-$$.raw"
}
trap cleanup EXIT

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1"; exit 1; }

# fio_iops URI RW -> IOPS (integer)
fio_iops() {
  taskset -c "$CLIENT_CPU" fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k \
    --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time=2 \
    --size="${SIZE_MB}M" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

# start_sluice NAME RPC... : sluice on SERVER_CPU exporting bdev "d0" over a Unix socket
start_sluice() {
  local dir="$WORK/sluice-$1"; shift
  mkdir -p "$dir"
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN" serve --runtime-dir "$dir" --cores "$SERVER_CPU" \
    --nbd-listen "unix:$dir/nbd.sock" >"$dir/log" 2>&1 &
  PIDS+=($!)
  wait_sock "$dir/sluice.sock"
  "$BIN" rpc -s "$dir/sluice.sock" "$@" >/dev/null
  "$BIN" rpc -s "$dir/sluice.sock" block-export-add type=nbd id=d0 node-name=d0 writable=true >/dev/null
  SLUICE_URI="nbd+unix:///d0?socket=$dir/nbd.sock"
  SLUICE_PID=$!
}

# start_qsd NAME BLOCKDEV : qemu-storage-daemon on SERVER_CPU exporting node d0
start_qsd() {
  local dir="$WORK/qsd-$1"
  mkdir -p "$dir"
  taskset -c "$SERVER_CPU" qemu-storage-daemon --blockdev "$2" \
    --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on >"$dir/log" 2>&1 &
  PIDS+=($!)
  wait_sock "$dir/nbd.sock"
  QSD_URI="nbd+unix:///d0?socket=$dir/nbd.sock"
  QSD_PID=$!
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

report() { # LABEL SLUICE QSD
  python3 -c "import sys; s,q=int(sys.argv[2]),int(sys.argv[3]); print(f'{sys.argv[1]:<34} sluice {s:>8} IOPS   qsd {q:>8} IOPS   ratio {s/max(q,1):.2f}x')" "$@"
}

bench_pair() { # LABEL
  for rw in randread randwrite; do
    local s q
    s=$(fio_iops "$SLUICE_URI" "$rw")
    q=$(fio_iops "$QSD_URI" "$rw")
    report "$1 $rw" "$s" "$q"
  done
}

echo "server on CPU $SERVER_CPU, fio on CPU $CLIENT_CPU, ${RUNTIME}s per run, 4 KiB, QD 32"
if [ "$WHAT" = ram ] || [ "$WHAT" = all ]; then
  blocks=$((SIZE_MB * 2048))
  start_sluice ram bdev_malloc_create name=d0 num_blocks=$blocks block_size=512
  # Touch every page once so the measurement is not of first-touch page faults.
  taskset -c "$CLIENT_CPU" fio --name=fill --ioengine=nbd --uri="$SLUICE_URI" --rw=write --bs=1M \
    --iodepth=8 --size="${SIZE_MB}M" >/dev/null 2>&1
  start_qsd ram "driver=null-co,node-name=d0,size=$((SIZE_MB * 1048576))"
  bench_pair "RAM (malloc vs null-co)"
  stop_pid "$SLUICE_PID"; stop_pid "$QSD_PID"
  start_sluice null bdev_null_create name=d0 num_blocks=$blocks block_size=512
  start_qsd null "driver=null-co,node-name=d0,size=$((SIZE_MB * 1048576))"
  bench_pair "RAM (null vs null-co)"
  stop_pid "$SLUICE_PID"; stop_pid "$QSD_PID"
fi
if [ "$WHAT" = file ] || [ "$WHAT" = all ]; then
  f="$BENCH_DIR/nbdbench-$$.raw"
  # Real data everywhere, so neither server reads holes.
  dd if=/dev/urandom of="$f" bs=1M count="$SIZE_MB" status=none
  start_sluice file bdev_uring_create name=d0 filename="$f" block_size=512
  start_qsd file "driver=file,node-name=d0,filename=$f,cache.direct=on,aio=io_uring"
  bench_pair "raw file (uring O_DIRECT)"
  stop_pid "$SLUICE_PID"; stop_pid "$QSD_PID"
fi

#!/usr/bin/env bash
# NBD export benchmark, side by side with qemu-storage-daemon exporting the same
# data: fio's nbd engine, 4 KiB randread and randwrite at QD 32, server pinned to
# one core and fio to another, one server running at a time. Per round the
# sides rotate (who goes first alternates) and caches are dropped before each
# server starts; medians over ROUNDS, with sluice/QSD ratios.
#
#   scripts/bench/nbd.sh [ram|file|all]      (default: all)
#
# Cases: ram (sluice malloc, then sluice null, against QSD's null-co: QEMU has
# no RAM disk that keeps data; null-co has no aio setting, so its defaults are
# its best) and file (a raw file of random data: sluice's uring bdev O_DIRECT
# against QSD's file driver with cache.direct=on and its default aio=threads,
# and with aio=io_uring, its best here).
# Data: every server that keeps data (sluice malloc and uring, QSD's file
# driver) passes a fio verify run first (random 4 KiB writes with checksums,
# read back) before its times count; null devices hold no data to check.
#
# Environment: SLUICE_BIN (default target/release/sluice, built if missing),
# SERVER_CPU (0), CLIENT_CPU (1), RUNTIME (seconds per run, 10), SIZE_MB (1024),
# ROUNDS (1), BENCH_DIR (a directory on a real disk for the raw file, /var/tmp).
# Needs: fio with the nbd engine (Debian: fio), qemu-storage-daemon, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source scripts/bench/lib.sh

WHAT="${1:-all}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
RUNTIME="${RUNTIME:-10}"
SIZE_MB="${SIZE_MB:-1024}"
ROUNDS="${ROUNDS:-1}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
BIN="${SLUICE_BIN:-target/release/sluice}"

command -v fio >/dev/null || { echo "fio is missing (apt-get install fio)"; exit 1; }
fio --enghelp 2>/dev/null | grep -w nbd >/dev/null || { echo "this fio has no nbd engine"; exit 1; }
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
  rm -rf "$dir"; mkdir -p "$dir"
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN" serve --runtime-dir "$dir" --cores "$SERVER_CPU" \
    --nbd-listen "unix:$dir/nbd.sock" >"$dir/log" 2>&1 &
  SPID=$!; PIDS+=($SPID)
  wait_sock "$dir/sluice.sock"
  "$BIN" rpc -s "$dir/sluice.sock" "$@" >/dev/null
  "$BIN" rpc -s "$dir/sluice.sock" block-export-add type=nbd id=d0 node-name=d0 writable=true >/dev/null
  URI="nbd+unix:///d0?socket=$dir/nbd.sock"
}

# start_qsd NAME BLOCKDEV : qemu-storage-daemon on SERVER_CPU exporting node d0
start_qsd() {
  local dir="$WORK/qsd-$1"
  rm -rf "$dir"; mkdir -p "$dir"
  taskset -c "$SERVER_CPU" qemu-storage-daemon --blockdev "$2" \
    --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on >"$dir/log" 2>&1 &
  SPID=$!; PIDS+=($SPID)
  wait_sock "$dir/nbd.sock"
  URI="nbd+unix:///d0?socket=$dir/nbd.sock"
}

stop_server() { kill "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; }

# start SIDE: one server of the current case (CASE, FILE set by the caller).
start() {
  local blocks=$((SIZE_MB * 2048)) bytes=$((SIZE_MB * 1048576))
  case "$CASE/$1" in
    ram/sluice_malloc)
      start_sluice malloc bdev_malloc_create name=d0 num_blocks=$blocks block_size=512
      fio_verify_nbd "$URI"
      # Touch every page once so the measurement is not of first-touch page faults.
      taskset -c "$CLIENT_CPU" fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_MB}M" >/dev/null 2>&1 ;;
    ram/sluice_null) start_sluice null bdev_null_create name=d0 num_blocks=$blocks block_size=512 ;;
    ram/qsd) start_qsd null "driver=null-co,node-name=d0,size=$bytes" ;;
    file/sluice) start_sluice file bdev_uring_create name=d0 filename="$FILE" block_size=512; fio_verify_nbd "$URI" ;;
    file/qsd) start_qsd file "driver=file,node-name=d0,filename=$FILE,cache.direct=on"; fio_verify_nbd "$URI" ;;
    file/qsd_uring) start_qsd file "driver=file,node-name=d0,filename=$FILE,cache.direct=on,aio=io_uring"; fio_verify_nbd "$URI" ;;
  esac
}

declare -A RES=()
# run_case CASE SIDE... : ROUNDS rounds, sides rotating, both workloads per server.
run_case() {
  CASE=$1; shift
  local r side rw
  for r in $(seq 0 $((ROUNDS - 1))); do
    for side in $(rotate "$r" "$@"); do
      drop_caches
      start "$side"
      for rw in randread randwrite; do RES[$CASE/$side/$rw]+=" $(fio_iops "$URI" "$rw")"; done
      stop_server
    done
  done
}

# report CASE LABEL SLUICE_SIDE QSD_SIDE
report() {
  local rw s q
  for rw in randread randwrite; do
    # shellcheck disable=SC2086
    s=$(median ${RES[$1/$3/$rw]}); q=$(median ${RES[$1/$4/$rw]})
    python3 -c "import sys; s,q=float(sys.argv[2]),float(sys.argv[3]); print(f'{sys.argv[1]:<48} sluice {s:>8.0f} IOPS   qsd {q:>8.0f} IOPS   ratio {s/max(q,1):.2f}x')" \
      "$2 $rw" "$s" "$q"
  done
}

echo "server on CPU $SERVER_CPU, fio on CPU $CLIENT_CPU, ${RUNTIME}s per run, 4 KiB, QD 32, medians of $ROUNDS round(s); load $(loadavg)"
if [ "$WHAT" = ram ] || [ "$WHAT" = all ]; then
  run_case ram sluice_malloc sluice_null qsd
  report ram "RAM (malloc vs null-co)" sluice_malloc qsd
  report ram "RAM (null vs null-co)" sluice_null qsd
fi
if [ "$WHAT" = file ] || [ "$WHAT" = all ]; then
  FILE="$BENCH_DIR/nbdbench-$$.raw"
  # Real data everywhere, so neither server reads holes.
  dd if=/dev/urandom of="$FILE" bs=1M count="$SIZE_MB" status=none
  run_case file sluice qsd qsd_uring
  report file "raw file (uring vs QSD aio=threads, O_DIRECT)" sluice qsd
  report file "raw file (uring vs QSD aio=io_uring, O_DIRECT)" sluice qsd_uring
fi
echo "load after: $(loadavg)"

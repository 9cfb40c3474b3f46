#!/usr/bin/env bash
# What the data-safety work costs, side by side, in one run:
#
#   fua:     4 KiB writes over NBD from `qemu-img bench` (QEMU's block layer as the
#            client, the same requests for both servers) into a qcow2 image, once
#            with -t writeback (plain writes) and once with -t writethrough (QEMU
#            sends every write with FUA): sluice against qemu-storage-daemon with
#            its defaults (aio=threads) and with aio=io_uring (its best here), who
#            goes first rotating per round. The three results are compared with
#            `qemu-img compare` and `qemu-img check` before a time counts.
#   overlap: sluice perf 4 KiB random writes (rewrite of an allocated image, and
#            first writes into an empty one) on /dev/shm, where the CPU cost per I/O
#            shows: the build before the overlap checks (OLD_BIN) against this one
#            (no QEMU: an A/B of two sluice builds; tmpfs has no cache to drop).
#            Skipped without OLD_BIN.
#   open:    opening a 1 TiB image whose L2 tables are all allocated
#            (preallocation=metadata) writable, caches dropped first: sluice's
#            bdev_qcow2_open (which now checks refcounts against references) against
#            qemu-io -c quit (less qemu-io's own start on a tiny image), with its
#            default aio=threads and with -i io_uring.
#
#   scripts/bench/data_safety.sh [fua|overlap|open|all]   (default all)
#
# Environment: SLUICE_BIN (target/release/sluice), OLD_BIN, BENCH_DIR (/var/tmp),
# ROUNDS (2), COUNT (requests per qemu-img bench run, 20000), RUNTIME (sluice perf
# seconds, 4), SERVER_CPU (0), CLIENT_CPU (1), DIRECT (0: page cache; 1: O_DIRECT),
# DEPTH (qemu-img bench's queue depth, 16), PARK_US (sluice serve --park-after-us,
# its default when unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source scripts/bench/lib.sh
WHAT="${1:-all}"
BIN="${SLUICE_BIN:-target/release/sluice}"
OLD="${OLD_BIN:-}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
ROUNDS="${ROUNDS:-2}"
COUNT="${COUNT:-20000}"
RUNTIME="${RUNTIME:-4}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
DIRECT="${DIRECT:-0}"
DEPTH="${DEPTH:-16}"
PARK=(); [ -n "${PARK_US:-}" ] && PARK=(--park-after-us "$PARK_US")
[ -x "$BIN" ] || cargo build --release -p sluice --bin sluice
WORK="$(mktemp -d "$BENCH_DIR/dsbench.XXXXXX")"
SHM="$(mktemp -d /dev/shm/dsbench.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK" "$SHM"; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
if [ "$DIRECT" = 1 ]; then SDIRECT=true; QCACHE="cache.direct=on"; else SDIRECT=false; QCACHE="cache.direct=off"; fi

# serve_sluice DIR IMAGE -> sets URI, SPID
serve_sluice() {
  mkdir -p "$1"
  RUST_LOG=error taskset -c "$SERVER_CPU" "$BIN" serve --runtime-dir "$1" --cores "$SERVER_CPU" "${PARK[@]}" \
    --nbd-listen "unix:$1/nbd.sock" >"$1/log" 2>&1 &
  SPID=$!; PIDS+=($SPID)
  wait_sock "$1/sluice.sock"
  "$BIN" rpc -s "$1/sluice.sock" bdev_qcow2_open name=d0 filename="$2" direct="$SDIRECT" >/dev/null
  "$BIN" rpc -s "$1/sluice.sock" block-export-add type=nbd id=e0 device=d0 writable=true >/dev/null
  URI="nbd+unix:///d0?socket=$1/nbd.sock"
}
# serve_qsd DIR IMAGE [AIO]: QSD with QEMU's default aio (threads) or AIO.
serve_qsd() {
  mkdir -p "$1"
  taskset -c "$SERVER_CPU" qemu-storage-daemon \
    --blockdev "driver=qcow2,node-name=d0,file.driver=file,file.filename=$2,file.$QCACHE,file.aio=${3:-threads}" \
    --nbd-server "addr.type=unix,addr.path=$1/nbd.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on >"$1/log" 2>&1 &
  SPID=$!; PIDS+=($SPID)
  wait_sock "$1/nbd.sock"
  URI="nbd+unix:///d0?socket=$1/nbd.sock"
}
serve_qsd_uring() { serve_qsd "$1" "$2" io_uring; }
stop() { kill "$SPID"; wait "$SPID" 2>/dev/null || true; }
# bench URI CACHE -> IOPS (qemu-img bench writes pattern 0xa5, a stride that wraps over the 1 GiB image)
bench() {
  local out
  out=$(taskset -c "$CLIENT_CPU" qemu-img bench -f raw -t "$2" -w -d "$DEPTH" -s 4096 -c "$COUNT" \
    -S $((4096 * 16411)) --pattern 0xa5 "$1" 2>&1) || { echo "qemu-img bench failed: $out" >&2; exit 1; }
  python3 -c 'import re,sys; t=float(re.search(r"completed in ([0-9.]+)", sys.argv[2]).group(1)); print(int(int(sys.argv[1])/t))' "$COUNT" "$out"
}

if [ "$WHAT" = fua ] || [ "$WHAT" = all ]; then
  echo "== fua: qemu-img bench over NBD, 4 KiB writes, QD $DEPTH, $COUNT requests, DIRECT=$DIRECT"
  for kind in empty full; do
    for cache in writeback writethrough; do
      for r in $(seq "$ROUNDS"); do
        for side in sluice qsd qsd_uring; do
          qemu-img create -q -f qcow2 "$WORK/$side.qcow2" 1G
          [ "$kind" = full ] && qemu-io -c 'write -P 0x11 0 1G' "$WORK/$side.qcow2" >/dev/null
        done
        order=$(rotate "$r" sluice qsd qsd_uring)
        declare -A IOPS=()
        for side in $order; do
          drop_caches
          "serve_$side" "$WORK/srv-$side-$kind-$cache-$r" "$WORK/$side.qcow2"
          IOPS[$side]=$(bench "$URI" "$cache")
          stop
        done
        for side in sluice qsd qsd_uring; do qemu-img check -q "$WORK/$side.qcow2"; done
        for side in qsd qsd_uring; do
          qemu-img compare -q "$WORK/sluice.qcow2" "$WORK/$side.qcow2" || { echo "results differ ($side)" >&2; exit 1; }
        done
        printf '%-6s %-12s round %s (%s first): sluice %7d IOPS  qsd (aio=threads) %7d  qsd (io_uring) %7d  ratio %sx / %sx\n' \
          "$kind" "$cache" "$r" "${order%% *}" "${IOPS[sluice]}" "${IOPS[qsd]}" "${IOPS[qsd_uring]}" \
          "$(ratio "${IOPS[sluice]}" "${IOPS[qsd]}")" "$(ratio "${IOPS[sluice]}" "${IOPS[qsd_uring]}")"
      done
    done
  done
fi

perf() { # BIN WORKLOAD IMAGE -> IOPS
  local cfg="$SHM/cfg.json"
  printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_qcow2_open","params":{"node_name":"t","filename":"%s"}}]}]}\n' "$3" >"$cfg"
  RUST_LOG=error "$1" perf -c "$cfg" -T t -m "$(printf '0x%x' $((1 << SERVER_CPU)))" -q 32 -o 4096 -w "$2" \
    -t "$RUNTIME" --json 2>>"$SHM/perf.log" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["total"]["iops"]))'
}
if [ "$WHAT" = overlap ] || [ "$WHAT" = all ]; then
  if [ -z "$OLD" ]; then
    echo "== overlap: skipped (set OLD_BIN to a sluice built before the overlap checks)"
  else
    echo "== overlap: sluice perf, 4 KiB randwrite QD 32 on /dev/shm, old build vs this one"
    qemu-img create -q -f qcow2 "$SHM/full.qcow2" 1G
    qemu-io -c 'write -P 0x11 0 1G' "$SHM/full.qcow2" >/dev/null
    for r in $(seq "$ROUNDS"); do
      order="old new"; [ $((r % 2)) = 0 ] && order="new old"
      declare -A RW=() FW=()
      for side in $order; do
        b="$BIN"; [ "$side" = old ] && b="$OLD"
        RW[$side]=$(perf "$b" randwrite "$SHM/full.qcow2")
        qemu-img create -q -f qcow2 "$SHM/fw.qcow2" 64G
        FW[$side]=$(perf "$b" randwrite "$SHM/fw.qcow2")
        qemu-img check -q "$SHM/fw.qcow2"
      done
      qemu-img check -q "$SHM/full.qcow2"
      printf 'round %s (%s first): rewrite old %7d new %7d (new/old %sx)   first write old %7d new %7d (new/old %sx)\n' \
        "$r" "${order%% *}" "${RW[old]}" "${RW[new]}" "$(ratio "${RW[new]}" "${RW[old]}")" \
        "${FW[old]}" "${FW[new]}" "$(ratio "${FW[new]}" "${FW[old]}")"
    done
  fi
fi

if [ "$WHAT" = open ] || [ "$WHAT" = all ]; then
  echo "== open: 1 TiB image, preallocation=metadata (all L2 tables), writable open, caches dropped"
  qemu-img create -q -f qcow2 -o preallocation=metadata "$WORK/big.qcow2" 1T
  qemu-img create -q -f qcow2 "$WORK/tiny.qcow2" 1M
  qemu-io -c 'write -P 0x33 100G 64k' "$WORK/big.qcow2" >/dev/null
  # open_sluice R -> ms; open_qemu -> ms (qemu-io's start on a tiny image subtracted)
  open_sluice() {
    mkdir -p "$WORK/o$1"
    RUST_LOG=error "$BIN" serve --runtime-dir "$WORK/o$1" --cores "$SERVER_CPU" >"$WORK/o$1/log" 2>&1 &
    SPID=$!; PIDS+=($SPID)
    wait_sock "$WORK/o$1/sluice.sock"
    local t0 t1
    t0=$(date +%s%N)
    "$BIN" rpc -s "$WORK/o$1/sluice.sock" bdev_qcow2_open name=d0 filename="$WORK/big.qcow2" >/dev/null
    t1=$(date +%s%N)
    "$BIN" rpc -s "$WORK/o$1/sluice.sock" bdev_qcow2_delete name=d0 >/dev/null
    stop
    echo $(((t1 - t0) / 1000000))
  }
  open_qemu() { # [AIO]
    local t0 t1 t2 t3
    t0=$(date +%s%N); qemu-io -i "${1:-threads}" -c quit "$WORK/big.qcow2"; t1=$(date +%s%N)
    t2=$(date +%s%N); qemu-io -i "${1:-threads}" -c quit "$WORK/tiny.qcow2"; t3=$(date +%s%N)
    echo $(((t1 - t0 - (t3 - t2)) / 1000000))
  }
  for r in $(seq "$ROUNDS"); do
    order=$(rotate "$r" sluice qemu qemu_uring)
    declare -A MS=()
    for side in $order; do
      drop_caches
      case $side in
        sluice) MS[sluice]=$(open_sluice "$r") ;;
        qemu) MS[qemu]=$(open_qemu threads) ;;
        qemu_uring) MS[qemu_uring]=$(open_qemu io_uring) ;;
      esac
      # The image still holds its data after each open.
      qemu-io -r -c 'read -P 0x33 100G 64k' "$WORK/big.qcow2" >/dev/null
    done
    printf 'round %s (%s first): sluice open %5d ms   qemu-io open %5d ms (aio=threads), %5d ms (io_uring)   ratio %sx / %sx\n' \
      "$r" "${order%% *}" "${MS[sluice]}" "${MS[qemu]}" "${MS[qemu_uring]}" \
      "$(ratio "${MS[sluice]}" "${MS[qemu]}")" "$(ratio "${MS[sluice]}" "${MS[qemu_uring]}")"
  done
fi

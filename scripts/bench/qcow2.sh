#!/usr/bin/env bash
# qcow2 benchmark: 4 KiB random I/O at QD 32 on one core, a qcow2 image over the
# uring bdev against the raw uring bdev, side by side with QEMU on the same
# images, in one run:
#
#   - sluice perf (one reactor): raw file vs qcow2 image (sluice's qcow2 over uring)
#   - qemu-img bench (QEMU's block layer in-process, io_uring): raw vs qcow2
#   - over NBD, fio's nbd engine as the client: `sluice serve` exporting the qcow2
#     image vs qemu-storage-daemon exporting it (server on SERVER_CPU, fio on CLIENT_CPU)
#
# QEMU runs with its default aio=threads and with aio=io_uring (its best here),
# both for qemu-img bench (-i) and for QSD's file node. Per round the sides
# (sluice perf, qemu-img bench x2, sluice NBD, QSD NBD x2) rotate, so each goes
# first in turn; caches are dropped before every run; medians of ROUNDS.
# Data: sluice perf passes a `perf -w verify` run on a qcow2 image first; each
# NBD server passes a fio verify run (checksummed 4 KiB writes read back) on
# the allocated image before its times count; after every first-write run the
# image passes `qemu-img check`, and qemu-img bench's writes are read back with
# qemu-io (its pattern at offset 0).
#
# Workloads: randread of a fully allocated image (random data in every cluster),
# first-write allocation (randwrite on an empty image / a sparse raw file), and
# rewrite (randwrite on the fully allocated image).
#
#   scripts/bench/qcow2.sh [disk|mem|all]     (default: disk)
#
#   disk: files in BENCH_DIR, O_DIRECT everywhere (cache=none for QEMU).
#   mem:  files in /dev/shm, buffered I/O (tmpfs has no O_DIRECT; cache=writeback
#         for QEMU): no device in the way, so the figures show CPU cost per I/O.
#
# Environment: SLUICE_BIN (default target/release/sluice, built if missing),
# SIZE_GB (allocated images, 4), FW_SIZE_GB (virtual size of the first-write
# images, 64, so almost every write of a run lands in a new cluster), CLUSTER
# (65536), RUNTIME (seconds per sluice/fio run, 5), QIB_COUNT (requests per
# qemu-img bench run, 100000), SERVER_CPU (0), CLIENT_CPU (1), BENCH_DIR (/var/tmp),
# ROUNDS (1), NBD=0 to skip the NBD part.
#
# qemu-img bench has no random mode: it steps through the image by a fixed
# stride (here 16411 * 4 KiB, wrapping modulo the image size), which spreads
# requests over the whole image and gives every first write a new cluster.
# Needs: qemu-img, qemu-storage-daemon, fio with the nbd engine, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source scripts/bench/lib.sh

WHAT="${1:-disk}"
ROUNDS="${ROUNDS:-1}"
SIZE_GB="${SIZE_GB:-4}"
FW_SIZE_GB="${FW_SIZE_GB:-64}"
CLUSTER="${CLUSTER:-65536}"
RUNTIME="${RUNTIME:-5}"
QIB_COUNT="${QIB_COUNT:-100000}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
NBD="${NBD:-1}"
BIN="${SLUICE_BIN:-target/release/sluice}"
QD=32
STEP=$((4096 * 16411))

case "$WHAT" in disk|mem|all) ;; *) echo "usage: $0 [disk|mem|all]"; exit 2 ;; esac
for t in qemu-img qemu-storage-daemon python3; do
  command -v "$t" >/dev/null || { echo "$t is missing"; exit 1; }
done
if [ "$NBD" = 1 ]; then
  command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -w nbd >/dev/null ||
    { echo "fio with the nbd engine is missing (NBD=0 skips the NBD part)"; exit 1; }
fi
[ -x "$BIN" ] || cargo build --release -p sluice --bin sluice

WORK="$(mktemp -d /tmp/qcow2bench.XXXXXX)"
DATA=""
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
  [ -n "$DATA" ] && rm -rf "$DATA"
}
trap cleanup EXIT

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# sluice_perf WORKLOAD METHOD PARAMS_JSON -> IOPS: one bdev "t" from a one-line config.
sluice_perf() {
  local cfg="$WORK/cfg.json"
  printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"%s","params":%s}]}]}\n' "$2" "$3" >"$cfg"
  RUST_LOG=error "$BIN" perf -c "$cfg" -T t -m "$(printf '0x%x' $((1 << SERVER_CPU)))" \
    -q "$QD" -o 4096 -w "$1" -t "$RUNTIME" --json 2>>"$WORK/perf.log" |
    python3 -c 'import json,sys; print(int(json.load(sys.stdin)["total"]["iops"]))'
}

# qemu_bench AIO FMT FILE [-w] -> IOPS (writes: pattern 0xa5, read back at offset 0)
qemu_bench() {
  local aio="$1" fmt="$2" file="$3"; shift 3
  local out
  [ "${1:-}" = -w ] && set -- "$@" --pattern 0xa5
  out=$(taskset -c "$SERVER_CPU" qemu-img bench -f "$fmt" -t "$QCACHE" -i "$aio" -d "$QD" -s 4096 \
    -c "$QIB_COUNT" -S "$STEP" "$@" "$file" 2>&1) || { echo "qemu-img bench failed: $out" >&2; exit 1; }
  if [ "${1:-}" = -w ]; then
    qemu-io -f "$fmt" -c 'read -P 0xa5 0 4k' "$file" | grep '^read' >/dev/null ||
      { echo "qemu-img bench's writes are not in $file" >&2; exit 1; }
  fi
  python3 -c 'import re,sys; t=float(re.search(r"completed in ([0-9.]+)", sys.argv[2]).group(1)); print(int(int(sys.argv[1])/t))' \
    "$QIB_COUNT" "$out"
}

# fio_nbd URI RW -> IOPS
fio_nbd() {
  taskset -c "$CLIENT_CPU" fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k \
    --iodepth="$QD" --numjobs=1 --time_based --runtime="$RUNTIME" --size="$3" \
    --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

# sluice_nbd IMAGE RW SIZE [verify] -> IOPS: sluice serve exporting IMAGE as "d0".
sluice_nbd() {
  local dir="$WORK/sluice-nbd"
  rm -rf "$dir"; mkdir -p "$dir"
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN" serve --runtime-dir "$dir" --cores "$SERVER_CPU" \
    --nbd-listen "unix:$dir/nbd.sock" >"$dir/log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_sock "$dir/sluice.sock"
  "$BIN" rpc -s "$dir/sluice.sock" bdev_qcow2_open name=d0 filename="$1" direct="$DIRECT" >/dev/null
  "$BIN" rpc -s "$dir/sluice.sock" block-export-add type=nbd id=d0 node-name=d0 writable=true >/dev/null
  [ -n "${4:-}" ] && fio_verify_nbd "nbd+unix:///d0?socket=$dir/nbd.sock"
  fio_nbd "nbd+unix:///d0?socket=$dir/nbd.sock" "$2" "$3"
  stop_pid "$pid"
}

# qsd_nbd AIO IMAGE RW SIZE [verify] -> IOPS: qemu-storage-daemon exporting IMAGE as "d0".
qsd_nbd() {
  local dir="$WORK/qsd-nbd" aio="$1"; shift
  rm -rf "$dir"; mkdir -p "$dir"
  taskset -c "$SERVER_CPU" qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$1,cache.direct=$QDIRECT,aio=$aio" \
    --blockdev "driver=qcow2,node-name=d0,file=f0" \
    --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on >"$dir/log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_sock "$dir/nbd.sock"
  [ -n "${4:-}" ] && fio_verify_nbd "nbd+unix:///d0?socket=$dir/nbd.sock"
  fio_nbd "nbd+unix:///d0?socket=$dir/nbd.sock" "$2" "$3"
  stop_pid "$pid"
}

new_qcow2() { qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER" "$1" "${FW_SIZE_GB}G"; }
new_sparse() { rm -f "$1"; truncate -s "${FW_SIZE_GB}G" "$1"; }

row() { # LABEL A_RUNS B_RUNS -> "label  A  B  B/A" (medians of the runs)
  # shellcheck disable=SC2086
  python3 -c 'import sys; a,b=float(sys.argv[2]),float(sys.argv[3]); print(f"  {sys.argv[1]:<34} {a:>9.0f} {b:>9.0f}   {b/max(a,1):5.2f}")' \
    "$1" "$(median $2)" "$(median $3)"
}

run_mode() {
  local mode="$1"
  if [ "$mode" = disk ]; then
    DATA="$(mktemp -d "$BENCH_DIR/qcow2bench.XXXXXX")"
    DIRECT=true; QCACHE=none; QDIRECT=on
  else
    DATA="$(mktemp -d /dev/shm/qcow2bench.XXXXXX)"
    DIRECT=false; QCACHE=writeback; QDIRECT=off
  fi
  local raw="$DATA/raw.img" full="$DATA/full.qcow2" fw="$DATA/fw.qcow2" fwraw="$DATA/fw.raw"
  echo "== $mode: ${SIZE_GB} GiB images in $DATA, cluster $CLUSTER, first-write images ${FW_SIZE_GB} GiB virtual"
  # Random data everywhere, so nobody reads holes; then the same data as qcow2.
  dd if=/dev/urandom of="$raw" bs=1M count=$((SIZE_GB * 1024)) status=none
  qemu-img convert -O qcow2 -o "cluster_size=$CLUSTER" "$raw" "$full"
  local uring qopen
  uring() { printf '{"name":"t","filename":"%s","block_size":512,"direct":%s}' "$1" "$DIRECT"; }
  qopen() { printf '{"node_name":"t","filename":"%s","direct":%s}' "$1" "$DIRECT"; }

  # sluice's qcow2 data path passes a verify run before any time counts.
  qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER" "$DATA/verify.qcow2" 64M
  printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_qcow2_open","params":%s}]}]}\n' \
    "$(qopen "$DATA/verify.qcow2")" >"$WORK/verify.json"
  sluice_verify "$BIN" -c "$WORK/verify.json" -T t -q 16 -m "$(printf '0x%x' $((1 << SERVER_CPU)))"
  qemu-img check -q "$DATA/verify.qcow2"; rm -f "$DATA/verify.qcow2"
  declare -A R=()
  add() { R[$1]+=" $2"; }
  side_sp() { # sluice perf: raw uring and qcow2
    drop_caches; add sp_raw_read "$(sluice_perf randread bdev_uring_create "$(uring "$raw")")"
    drop_caches; add sp_q_read "$(sluice_perf randread bdev_qcow2_open "$(qopen "$full")")"
    new_sparse "$fwraw"
    drop_caches; add sp_raw_fw "$(sluice_perf randwrite bdev_uring_create "$(uring "$fwraw")")"
    rm -f "$fwraw"; new_qcow2 "$fw"
    drop_caches; add sp_q_fw "$(sluice_perf randwrite bdev_qcow2_open "$(qopen "$fw")")"
    qemu-img check -q "$fw"; rm -f "$fw"
    drop_caches; add sp_raw_rw "$(sluice_perf randwrite bdev_uring_create "$(uring "$raw")")"
    drop_caches; add sp_q_rw "$(sluice_perf randwrite bdev_qcow2_open "$(qopen "$full")")"
  }
  side_qb() { # qemu-img bench with aio $1: raw and qcow2
    local a=$1 k=qb; [ "$1" = io_uring ] && k=qu
    drop_caches; add ${k}_raw_read "$(qemu_bench "$a" raw "$raw")"
    drop_caches; add ${k}_q_read "$(qemu_bench "$a" qcow2 "$full")"
    new_sparse "$fwraw"
    drop_caches; add ${k}_raw_fw "$(qemu_bench "$a" raw "$fwraw" -w)"
    rm -f "$fwraw"; new_qcow2 "$fw"
    drop_caches; add ${k}_q_fw "$(qemu_bench "$a" qcow2 "$fw" -w)"
    qemu-img check -q "$fw"; rm -f "$fw"
    drop_caches; add ${k}_raw_rw "$(qemu_bench "$a" raw "$raw" -w)"
    drop_caches; add ${k}_q_rw "$(qemu_bench "$a" qcow2 "$full" -w)"
  }
  side_sn() { # sluice serve over NBD
    drop_caches; add sn_read "$(sluice_nbd "$full" randread "${SIZE_GB}G" verify)"
    new_qcow2 "$fw"
    drop_caches; add sn_fw "$(sluice_nbd "$fw" randwrite "${FW_SIZE_GB}G")"
    qemu-img check -q "$fw"; rm -f "$fw"
    drop_caches; add sn_rw "$(sluice_nbd "$full" randwrite "${SIZE_GB}G")"
  }
  side_qsd() { # QSD over NBD with aio $1
    local a=$1 k=qsd; [ "$1" = io_uring ] && k=qsdu
    drop_caches; add ${k}_read "$(qsd_nbd "$a" "$full" randread "${SIZE_GB}G" verify)"
    new_qcow2 "$fw"
    drop_caches; add ${k}_fw "$(qsd_nbd "$a" "$fw" randwrite "${FW_SIZE_GB}G")"
    qemu-img check -q "$fw"; rm -f "$fw"
    drop_caches; add ${k}_rw "$(qsd_nbd "$a" "$full" randwrite "${SIZE_GB}G")"
  }
  sides="sp qb qu"; [ "$NBD" = 1 ] && sides="sp qb qu sn qsd qsdu"
  local r side
  for r in $(seq 0 $((ROUNDS - 1))); do
    # shellcheck disable=SC2086
    for side in $(rotate "$r" $sides); do
      case $side in
        sp) side_sp ;; qb) side_qb threads ;; qu) side_qb io_uring ;;
        sn) side_sn ;; qsd) side_qsd threads ;; qsdu) side_qsd io_uring ;;
      esac
    done
  done

  echo "  4 KiB, QD $QD, one core; IOPS, medians of $ROUNDS round(s)"
  echo "  sluice perf                         raw uring     qcow2   qcow2/raw"
  row "randread (allocated)" "${R[sp_raw_read]}" "${R[sp_q_read]}"
  row "randwrite first write (allocation)" "${R[sp_raw_fw]}" "${R[sp_q_fw]}"
  row "randwrite rewrite" "${R[sp_raw_rw]}" "${R[sp_q_rw]}"
  local k aio
  for k in qb qu; do
    aio=threads; [ $k = qu ] && aio=io_uring
    echo "  qemu-img bench aio=$aio (stride $STEP)  raw  qcow2   qcow2/raw"
    row "read (allocated)" "${R[${k}_raw_read]}" "${R[${k}_q_read]}"
    row "write first write (allocation)" "${R[${k}_raw_fw]}" "${R[${k}_q_fw]}"
    row "write rewrite" "${R[${k}_raw_rw]}" "${R[${k}_q_rw]}"
  done
  for k in qb qu; do
    aio=threads; [ $k = qu ] && aio=io_uring
    echo "  sluice qcow2 vs qemu-img qcow2 (aio=$aio)  qemu-img  sluice  sluice/qemu"
    row "randread" "${R[${k}_q_read]}" "${R[sp_q_read]}"
    row "first write" "${R[${k}_q_fw]}" "${R[sp_q_fw]}"
    row "rewrite" "${R[${k}_q_rw]}" "${R[sp_q_rw]}"
  done
  if [ "$NBD" = 1 ]; then
    for k in qsd qsdu; do
      aio=threads; [ $k = qsdu ] && aio=io_uring
      echo "  qcow2 over NBD (fio nbd engine), QSD aio=$aio    qsd    sluice  sluice/qsd"
      row "randread (allocated)" "${R[${k}_read]}" "${R[sn_read]}"
      row "randwrite first write (allocation)" "${R[${k}_fw]}" "${R[sn_fw]}"
      row "randwrite rewrite" "${R[${k}_rw]}" "${R[sn_rw]}"
    done
  fi
  rm -rf "$DATA"; DATA=""
}

echo "sluice: $BIN; ${RUNTIME}s per run; CPU $SERVER_CPU (fio on $CLIENT_CPU); load: $(loadavg)"
if [ "$WHAT" = disk ] || [ "$WHAT" = all ]; then run_mode disk; fi
if [ "$WHAT" = mem ] || [ "$WHAT" = all ]; then run_mode mem; fi
echo "load after: $(loadavg)"

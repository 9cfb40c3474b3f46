#!/usr/bin/env bash
# Data-path cost as instructions per I/O (valgrind callgrind's Ir), for A/B
# comparisons of two builds on a shared, loaded machine where wall-clock IOPS
# swing by +-30% between runs: the instruction count does not depend on load.
# Each workload runs twice per binary (T1 and T2 seconds, one reactor, QD 32);
# (Ir(T2) - Ir(T1)) / (IOs(T2) - IOs(T1)) leaves start-up out.
#
#   scripts/bench/instr_per_io.sh BIN_A BIN_B
#
# Workloads: malloc 4 KiB randread / randwrite; a fully written 256 MiB qcow2
# image in /dev/shm (buffered uring below it) randread and rewrite.
# Env: T1 (2), T2 (6). Needs valgrind, qemu-img, qemu-io, python3.
# A control build (the same tree plus unused code) moved qcow2 randread by
# 1.2%: differences below about 2% are code layout, not work.
# The peer is the other sluice build, no QEMU (qcow2.sh and nbd.sh compare
# with QEMU). Instruction counts do not depend on load or on who runs first,
# but the order still alternates per workload; the images live in /dev/shm
# (tmpfs: no page cache to drop). Before any count, each binary passes a
# `sluice perf -w verify` run on malloc and on the qcow2 image.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
[ $# = 2 ] || { echo "usage: $0 BIN_A BIN_B"; exit 2; }
for t in valgrind qemu-img qemu-io python3; do command -v $t >/dev/null || { echo "$t is missing"; exit 1; }; done
T1=${T1:-2}; T2=${T2:-6}
W=$(mktemp -d /dev/shm/instr_per_io.XXXXXX); trap 'rm -rf "$W"' EXIT
qemu-img create -q -f qcow2 "$W/img.qcow2" 256M
qemu-io -f qcow2 -c "write -P 0x5a 0 256M" "$W/img.qcow2" >/dev/null
printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_qcow2_open","params":{"node_name":"t","filename":"%s","direct":false}}]}]}\n' "$W/img.qcow2" >"$W/q.json"
run() { # BIN SECONDS PERF_ARGS... -> "Ir IOs"
  local bin=$1 t=$2; shift 2
  RUST_LOG=error valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" perf "$@" -q 32 -t "$t" -m 0x1 --json >"$W/out" 2>"$W/err"
  echo "$(grep -o 'Collected : [0-9]*' "$W/err" | awk '{print $3}') $(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["total"]; print(int(j["iops"]*j["runtime"]))' "$W/out")"
}
BINS=("$1" "$2")
for bin in "${BINS[@]}"; do
  sluice_verify "$bin" --malloc V0:64:4096 -q 16 -m 0x1
  sluice_verify "$bin" -c "$W/q.json" -T t -q 16 -m 0x1
done
qemu-io -f qcow2 -c "write -P 0x5a 0 256M" "$W/img.qcow2" >/dev/null  # verify wrote patterns; the same image again
k=0
for w in "malloc_randread --malloc Malloc0:64:4096 -o 4k -w randread" \
         "malloc_randwrite --malloc Malloc0:64:4096 -o 4k -w randwrite" \
         "qcow2_randread -c $W/q.json -T t -o 4096 -w randread" \
         "qcow2_rewrite -c $W/q.json -T t -o 4096 -w randwrite"; do
  set -- $w; name=$1; shift
  declare -A res=()
  for i in $(rotate $k 0 1); do
    bin=${BINS[$i]}
    a=($(run "$bin" "$T1" "$@")); c=($(run "$bin" "$T2" "$@"))
    res[$i]=$(python3 -c 'import sys; a,b,c,d=map(int,sys.argv[1:]); print(f"{(c-a)/(d-b):.1f}")' "${a[0]}" "${a[1]}" "${c[0]}" "${c[1]}")
  done
  k=$((k + 1))
  python3 -c 'import sys; n,a,b=sys.argv[1],float(sys.argv[2]),float(sys.argv[3]); print(f"{n:18} A {a:8.1f}  B {b:8.1f} instr/IO  B/A {b/a:.3f}")' "$name" "${res[0]}" "${res[1]}"
done

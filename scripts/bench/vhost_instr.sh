#!/usr/bin/env bash
# The vhost-user-blk export's cost per request as instructions (valgrind
# callgrind's Ir), for A/B comparisons of two builds on a shared, loaded
# machine where times mean nothing (issue 18). The front end is
# vhost_instr.py (tests/py/vhost_client.py's rings): 4 KiB random reads at
# QD 32 from a 64 MiB raw file on disk (DATA_DIR, default /var/tmp, as
# vhost.sh's), read once before so the page cache holds it: the export's
# `file` node takes buffered io_uring reads, served from the page cache in
# the submission (a file on tmpfs would not do: the uring bdev reads tmpfs
# with pread on the reactor, another path), every read checked (status,
# used length, the block's own number and zeros after it). The reads go in
# lockstep batches of QD (one avail index update and one kick per batch, the
# next batch once the whole last one is back, EVENT_IDX) and the reactor
# parks as soon as it idles (--park-after-us 0): every busy poll pops a full
# batch and no polling for the slow front end is counted, so the counts
# repeat within about 0.5% (a guest's batches vary: this is the cost at full
# batches). Each binary serves N1 and then N2 reads in two runs (one
# reactor); (Ir(N2) - Ir(N1)) / (N2 - N1) leaves start-up, set-up and
# shutdown out. The count is the process's user-space work (io_uring's io-wq
# workers are kernel threads, not counted).
#
#   scripts/bench/vhost_instr.sh BIN_A BIN_B
#
# Env: N1 (3200), N2 (16000), QD (32), ROUNDS (1; the order alternates per
# round), KEEP=DIR keeps each run's callgrind.out (for callgrind_annotate),
# LOCKSTEP=0 refills each slot at once, PARK_US sets --park-after-us (0).
# No peer: QSD's cost is vhost.sh's business (TCG guest, CPU time); both
# sides here are sluice builds, and the page cache is kept warm on purpose
# (the counts are of the service's work, not of the disk).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
[ $# = 2 ] || { echo "usage: $0 BIN_A BIN_B"; exit 2; }
for t in valgrind python3; do command -v $t >/dev/null || { echo "$t is missing"; exit 1; }; done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
N1=${N1:-3200}; N2=${N2:-16000}; QD=${QD:-32}; ROUNDS=${ROUNDS:-1}
W=$(mktemp -d /dev/shm/vhost_instr.XXXXXX)
DATA=$(mktemp "${DATA_DIR:-/var/tmp}/vhost_instr.XXXXXX.raw")
trap 'rm -rf "$W" "$DATA"' EXIT
"$PY" -c 'import struct,sys
with open(sys.argv[1], "wb") as f:  # each 4 KiB block starts with its number
    for b in range(64 << 8):
        f.write(struct.pack("<Q", b) + bytes(4088))' "$DATA"
cat "$DATA" >/dev/null
run() { # BIN N TAG -> Ir
  local bin=$1 n=$2 tag=$3 out=/dev/null
  [ -n "${KEEP:-}" ] && { mkdir -p "$KEEP"; out=$KEEP/callgrind.out.$tag; }
  rm -rf "$W/run"
  VG="valgrind --tool=callgrind --callgrind-out-file=$out --log-file=$W/vg" \
    "$PY" "$ROOT/scripts/bench/vhost_instr.py" "$bin" "$DATA" "$W/run" "$n" "$QD" >"$W/py" ||
    { echo "run $tag failed: $(cat "$W/py") $(tail -5 "$W/run/log" 2>/dev/null)" >&2; exit 1; }
  grep -q "^reads=$n\$" "$W/py" || { echo "run $tag: $(cat "$W/py")" >&2; exit 1; }
  grep -o 'Collected : [0-9]*' "$W/vg" | awk '{print $3}'
}
BINS=("$1" "$2")
echo "vhost-user-blk 4 KiB randread QD $QD, N1 $N1 N2 $N2, load $(loadavg)"
for ((r = 0; r < ROUNDS; r++)); do
  declare -A res=()
  for i in $(rotate "$r" 0 1); do
    a=$(run "${BINS[$i]}" "$N1" "r$r-b$i-n1"); c=$(run "${BINS[$i]}" "$N2" "r$r-b$i-n2")
    res[$i]=$(python3 -c 'import sys; a,c,n1,n2=map(int,sys.argv[1:]); print(f"{(c-a)/(n2-n1):.1f}")' "$a" "$c" "$N1" "$N2")
  done
  python3 -c 'import sys; r,a,b=sys.argv[1],float(sys.argv[2]),float(sys.argv[3]); print(f"round {r}  A {a:8.1f}  B {b:8.1f} Ir/req  B/A {b/a:.3f}")' "$r" "${res[0]}" "${res[1]}"
done
echo "load after: $(loadavg)"

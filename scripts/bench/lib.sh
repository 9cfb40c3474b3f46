# Shared pieces of the shell benchmarks in scripts/bench (sourced, never run).
# The honesty rules they serve (issue 19, "Honest benchmarks"): the peer runs
# in the same script, who goes first alternates, caches are dropped before
# every timed run, QEMU runs with its defaults (aio=threads) as well as its
# best setting here (aio=io_uring), a run's data is checked before its time
# counts, and the script prints ratios. The Python halves use chainbench.py.

# drop_caches: sync, then drop the page cache (as root; a no-op elsewhere).
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# ratio A B -> A/B with two decimals.
ratio() { python3 -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f"{a/max(b,1e-9):.2f}")' "$1" "$2"; }

# median X... -> the median.
median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

# rotate ROUND SIDE... -> the sides rotated by ROUND (round 0 as given), so
# each side goes first in turn and none always follows the same neighbour.
rotate() {
  local r=$1; shift
  local n=$# i
  local a=("$@")
  for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((i + r) % n))]}"; done
  echo
}

# fio_verify_nbd URI [SIZE]: writes 4 KiB blocks at random offsets over SIZE
# (default 32M) through fio's nbd engine with a checksum in each, reads them
# back and fails the script on a mismatch: the server's data path is checked
# before its times count.
fio_verify_nbd() {
  local out
  out=$(fio --name=verify --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=16 \
    --size="${2:-32M}" --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=json 2>&1) ||
    { echo "fio verify through $1 failed: ${out: -2000}" >&2; exit 1; }
}

# sluice_verify BIN PERF_ARGS...: `sluice perf -w verify` for 1 s (each block
# written with a pattern and read back); fails the script on a miscompare.
sluice_verify() {
  local bin=$1 out; shift
  out=$(RUST_LOG=error "$bin" perf "$@" -w verify -t 1 --json) ||
    { echo "sluice perf verify failed: $out" >&2; exit 1; }
  python3 -c 'import json,sys; j=json.loads(sys.argv[1]); t=j["total"]
if not j["ok"] or j["errors"] or t["io_failed"] or not t["iops"]: raise SystemExit(f"verify failed: {j}")' "$out"
}

# loadavg: the 1, 5 and 15 minute load averages.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

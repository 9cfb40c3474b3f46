#!/usr/bin/env bash
# Reactor scaling: null bdevs, 4 KiB random reads at QD 128 per job, one
# reactor vs two (one job per reactor per bdev), alternately in the same run
# (median of $RUNS each), with the ratio. Goal: two reactors >= 1.8x one.
#
# On a shared machine the second core is often busy with other work, so the
# script also reports IOPS per CPU-second the process actually got (from
# getrusage): equal efficiency with one and two reactors means the reactors
# do not slow each other down, whatever CPU time the machine granted.
#
# No peer: this is sluice against itself (one reactor against two); QEMU has
# no polled reactors to scale (null_randread.sh compares the one-core figure
# with fio and qemu-img bench). Which mask goes first alternates per run. A
# null device holds no data and reads no file: nothing to check, no cache to
# drop.
#
# Env: T=seconds per run (5), RUNS (3), CORES ("0 1": the two cores to use),
#      NOZERO (set: leave read buffers untouched, as SPDK's null bdev does).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${T:-5}; RUNS=${RUNS:-3}; read -r C0 C1 <<<"${CORES:-0 1}"
SUFFIX=${NOZERO:+:nozero}
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -q -p sluice --bin sluice
    SLUICE=target/release/sluice
fi
ONE=$(printf '0x%x' $((1 << C0))); TWO=$(printf '0x%x' $(((1 << C0) | (1 << C1))))

python3 - "$SLUICE" "$SUFFIX" "$T" "$RUNS" "$ONE" "$TWO" <<'PY'
import json, os, resource, statistics, subprocess, sys
sluice, suffix, t, runs, one, two = sys.argv[1:]
def run(mask):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sluice, "perf", "--null", f"Null0:1024:512{suffix}", "-q", "128", "-o", "4k",
                          "-w", "randread", "-t", t, "-m", mask, "--json"],
                         env=dict(os.environ, RUST_LOG="error"), capture_output=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    iops = json.loads(out)["total"]["iops"]
    return iops, iops * float(t) / max(cpu, 1e-9)
a, b = [], []
for r in range(int(runs)):
    if r % 2 == 0:
        a.append(run(one)); b.append(run(two))
    else:
        b.append(run(two)); a.append(run(one))
i1, e1 = statistics.median(x[0] for x in a), statistics.median(x[1] for x in a)
i2, e2 = statistics.median(x[0] for x in b), statistics.median(x[1] for x in b)
print(f"load {os.getloadavg()[0]:.1f}; null 4KiB randread QD128 per reactor: 1 reactor ({one}) {i1/1e6:.2f}M IOPS, 2 reactors ({two}) "
      f"{i2/1e6:.2f}M IOPS; scaling {i2/i1:.2f}x (goal >= 1.8x)")
print(f"  IOPS per CPU-second granted: 1 reactor {e1/1e6:.2f}M, 2 reactors {e2/1e6:.2f}M "
      f"(efficiency ratio {e2/e1:.2f}; 2 x that = {2*e2/e1:.2f}x on two idle cores)")
PY

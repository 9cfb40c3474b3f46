#!/usr/bin/env bash
# A qcow2 image is served by its owner reactor; other reactors forward to it.
# This runs 4 KiB random reads and writes at QD 64 on a qcow2 image over a
# malloc bdev (all clusters allocated first) from the owner reactor alone, from
# the other reactor alone (every request forwarded) and from both, in one
# daemon, alternately (median of $RUNS), and prints each as a ratio of the
# owner alone. Forwarding costs nothing when "remote" is close to 1.0.
# No peer: sluice against itself (owner against forwarding reactor); QEMU
# has no per-reactor ownership to compare with. The order of the three masks
# rotates per run; before any time counts each mask passes a `perf -w
# verify` run on the image. malloc below: no file, no cache to drop.
#
# Env: T=seconds per run (3), RUNS (3), SLUICE (a sluice binary to measure,
#      e.g. an older build for an A/B; default: build this tree).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${T:-3}; RUNS=${RUNS:-3}
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -q -p sluice --bin sluice
    SLUICE=target/release/sluice
fi
if [ "$(nproc)" -lt 2 ]; then echo "needs 2 cores" >&2; exit 1; fi
D=$(mktemp -d)
"$SLUICE" serve -m 0x3 --runtime-dir "$D" >"$D/log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do [ -S "$D/sluice.sock" ] && break; sleep 0.05; done
S="$D/sluice.sock"
"$SLUICE" rpc -s "$S" bdev_malloc_create name=M0 num_blocks=524288 block_size=512 >/dev/null
# The image is opened (and owned) by reactor 0.
"$SLUICE" rpc -s "$S" bdev_qcow2_create name=Q0 base_bdev=M0 size=201326592 >/dev/null
"$SLUICE" perf -s "$S" -T Q0 -w write -o 1m -q 8 -t 1 >/dev/null

python3 - "$SLUICE" "$S" "$T" "$RUNS" <<'PY'
import json, os, statistics, subprocess, sys
sluice, sock, t, runs = sys.argv[1:]
for m in ("0x1", "0x2", "0x3"):
    j = json.loads(subprocess.run([sluice, "perf", "-s", sock, "-T", "Q0", "-w", "verify", "-q", "16", "-t", "1",
                                   "-m", m, "--json"], capture_output=True, check=True).stdout)
    if not j["ok"] or j["errors"] or j["total"]["io_failed"] or not j["total"]["iops"]:
        raise RuntimeError(f"verify from {m} failed: {j}")
print(f"verify from each mask passed; load {os.getloadavg()[0]:.1f}")
def iops(w, mask):
    out = subprocess.run([sluice, "perf", "-s", sock, "-T", "Q0", "-w", w, "-q", "64", "-t", t,
                          "-m", mask, "--json"], capture_output=True, check=True).stdout
    return json.loads(out)["total"]["iops"]
for w in ("randread", "randwrite"):
    r = {m: [] for m in ("0x1", "0x2", "0x3")}
    masks = list(r)
    for k in range(int(runs)):
        for m in masks[k % 3:] + masks[:k % 3]:
            r[m].append(iops(w, m))
    own, rem, both = (statistics.median(r[m]) for m in ("0x1", "0x2", "0x3"))
    print(f"qcow2/malloc 4KiB {w} QD64: owner {own/1e3:.0f}K, remote {rem/1e3:.0f}K "
          f"({rem/own:.2f} of owner), both reactors {both/1e3:.0f}K ({both/own:.2f})")
PY

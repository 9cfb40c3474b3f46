#!/usr/bin/env bash
# Commit benchmark: sluice vs qemu-storage-daemon, side by side, on the same
# three-layer qcow2 chain (scripts/bench/chainbench.py: base 60%, mid 20%,
# top 10% of the virtual size in 1 MiB extents of random data).
#
#   scripts/bench/commit.sh                    # 1 GiB, page cache and O_DIRECT, both modes, 2 rounds
#   SIZES=4 STORAGE=direct ROUNDS=3 scripts/bench/commit.sh
#
# Modes: intermediate (top-node=mid, base-node=base: mid's data into base, the
# job completes on its own) and active (the whole chain into base: READY, then
# block-job-complete pivots the device onto base).
# Each run: the pristine chain restored, caches dropped, then timed from the
# block-commit command until the process has exited after `quit` (the job plus
# closing the images, which flushes them: the result is durable). Who goes
# first alternates between rounds. QSD runs twice: with its defaults (aio=threads)
# and with aio=io_uring (its best here); the ratio is taken against the faster. Before a time counts, the result is checked:
# `qemu-img compare` against the chain's original content and `qemu-img check`.
# The floor: fio reading and writing the copied volume at once (1 MiB, QD 16,
# fdatasync at the end), O_DIRECT or buffered as the run.
# Goals (issue 14): sluice at least 2x faster than QSD, and within 1.2x of the floor.
# SLUICE: a sluice binary (default: a release build of this tree).
# Results: a table on stdout; JSON lines in $OUT (default bench-commit.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${SIZES:-1}
STORAGE=${STORAGE:-"pagecache direct"}
MODES=${MODES:-"intermediate active"}
ROUNDS=${ROUNDS:-2}
DISK_DIR=${DISK_DIR:-/var/tmp/sluice-bench}
OUT=${OUT:-bench-commit.jsonl}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
export SLUICE SIZES STORAGE MODES ROUNDS DISK_DIR OUT
exec "$PY" - <<'PYEOF'
import json, os, statistics, sys, tempfile, time
sys.path.insert(0, "scripts/bench")
from chainbench import (MiB, make_chain, restore, same_content, sh, start_qsd, start_sluice, stop,
                        fio_disk)

E = os.environ


def copied_bytes(names, mode):
    """What the commit copies: data allocated in the committed layers, as
    read through the topmost of them (each offset once)."""
    img, depth = (names[1], 1) if mode == "intermediate" else (names[2], 2)
    return sum(e["length"] for e in json.loads(sh("qemu-img", "map", "--output=json", img))
               if e["data"] and e["depth"] < depth)


def commit(q, device, mode):
    kw = {"job-id": "job0", "device": device}
    if mode == "intermediate":
        kw.update({"top-node": "mid", "base-node": "base"})
    q.cmd("block-commit", **kw)
    if mode == "active":
        q.wait("BLOCK_JOB_READY")
        q.cmd("block-job-complete", device="job0")
    ev = q.wait("BLOCK_JOB_COMPLETED")
    if "error" in ev["data"]:
        raise RuntimeError(f"commit failed: {ev}")


def run(side, names, mode, direct, tmp):
    restore(names)
    if side.startswith("qsd"):
        p, q = start_qsd(names, direct, tmp, aio="threads" if side == "qsd-default" else "io_uring")
        dev = "top"
    else:
        p, q = start_sluice(E["SLUICE"], names, direct, tmp)
        dev = "drive0"
    t0 = time.perf_counter()
    commit(q, dev, mode)
    job = time.perf_counter() - t0
    stop(p, q, side)
    durable = time.perf_counter() - t0
    # The result: top over base (intermediate) or base alone (active) reads
    # as the original chain, and every image checks clean.
    same_content(names[2] if mode == "intermediate" else names[0], names=names)
    return job, durable


out = open(E["OUT"], "a")
print(f"{'chain':>5} {'storage':>9} {'mode':>12} {'copied':>8} {'qsd dft':>7} {'qsd urg':>7} {'sluice s':>8} "
      f"{'qsd/sl':>6} {'floor s':>7} {'sl/floor':>8}  verdict (goals: best qsd/sl >= 2, sl/floor <= 1.2)")
for gib in [int(x) for x in E["SIZES"].split()]:
    names = make_chain(E["DISK_DIR"], gib)
    for storage in E["STORAGE"].split():
        direct = storage == "direct"
        for mode in E["MODES"].split():
            restore(names)
            copied = copied_bytes(names, mode)
            t = {"qsd-default": [], "qsd-uring": [], "sluice": []}
            with tempfile.TemporaryDirectory(prefix="sl-bench-") as tmp:
                for r in range(int(E["ROUNDS"])):
                    order = list(t) if r % 2 == 0 else list(reversed(t))
                    for side in order:
                        t[side].append(run(side, names, mode, direct, tmp))
            restore(names)
            floor = fio_disk(E["DISK_DIR"], names[0], copied, direct)
            med = {k: statistics.median(d for _, d in v) for k, v in t.items()}
            q = min(med["qsd-default"], med["qsd-uring"])  # QSD at its best
            s = med["sluice"]
            ok = q / s >= 2 and s / floor <= 1.2
            print(f"{gib:>4}G {storage:>9} {mode:>12} {copied / MiB:>6.0f}Mi {med['qsd-default']:>7.3f} "
                  f"{med['qsd-uring']:>7.3f} {s:>8.3f} {q / s:>6.2f} {floor:>7.3f} {s / floor:>8.2f}  "
                  f"{'OK' if ok else 'MISS'}", flush=True)
            out.write(json.dumps({"bench": "commit", "chain_gib": gib, "storage": storage, "mode": mode,
                                  "copied": copied, "runs": t, "medians_s": med, "floor_s": floor}) + "\n")
PYEOF

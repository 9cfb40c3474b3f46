#!/usr/bin/env bash
# Many jobs at once (issue 19): N (default 16) two-layer chains, each base
# holding MIB (default 64) MiB of incompressible data under an empty top,
# all N streamed at once: sluice on two reactors (-m 0x3) and
# qemu-storage-daemon (its defaults: aio=threads; and aio=io_uring) side by
# side, alternating who goes first, caches dropped before each run, every
# result checked with `qemu-img compare` before its time counts. The floor:
# fio reading and writing the total volume at once (1 MiB, QD 16, fdatasync).
# Fairness: query-block-jobs sampled every 0.2 s while all N run (every job
# started, none at its end); each job's progress (since the first sample,
# taken once the last block-stream returned) against the mean of all. Two
# figures: from a mean of 2 MiB on, and from a mean of a quarter of each job
# on. A job's progress is the done prefix of its walk and moves in whole
# chunks (sluice: 2 MiB, a few in flight), so at a mean of a few MiB the
# granularity alone reads as 50-100%; the second figure is the sound one.
# Goal: total time within 1.1x of the floor; every job within 20% of the mean.
#   scripts/bench/many_streams.sh
#   N=8 MIB=32 ROUNDS=1 scripts/bench/many_streams.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-16}
MIB=${MIB:-64}
ROUNDS=${ROUNDS:-2}
DISK_DIR=${DISK_DIR:-/var/tmp/sluice-bench-many-streams}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
export SLUICE N MIB ROUNDS DISK_DIR
exec "$PY" - <<'PYEOF'
import json, os, shutil, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, "scripts/bench")
from chainbench import MiB, Qmp, drop_caches, fio_disk, sh

E = os.environ
n, mib = int(E["N"]), int(E["MIB"])
d = E["DISK_DIR"]
os.makedirs(d, exist_ok=True)
bases = [os.path.join(d, f"b{i}.qcow2") for i in range(n)]
tops = [os.path.join(d, f"t{i}.qcow2") for i in range(n)]
stamp = os.path.join(d, f"{n}x{mib}.done")
if not os.path.exists(stamp):
    src = os.path.join(d, "rand.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(mib * MiB))
    for b, t in zip(bases, tops):
        sh("qemu-img", "create", "-q", "-f", "qcow2", b, f"{mib}M")
        sh("qemu-io", "-f", "qcow2", "-c", f"write -s {src} 0 {mib}M", b)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t + ".orig")
    open(stamp, "w").close()


def fresh():
    for t in tops:
        shutil.copyfile(t + ".orig", t)
    drop_caches()


def watch(q, t0):
    """Samples progress until no job is left; returns (seconds, worst
    deviation from a mean of 2 MiB on, from a quarter of each job on)."""
    base, worst, worst_q = None, None, None
    while True:
        jobs = q.cmd("query-block-jobs")
        if not jobs:
            return time.perf_counter() - t0, (worst, worst_q)
        if len(jobs) == n:
            offs = {j["device"]: j["offset"] for j in jobs}
            if base is None:
                base = offs
            prog = [offs[k] - base[k] for k in offs]
            mean = sum(prog) / n
            if mean >= 2 * MiB and all(o < mib * MiB for o in offs.values()):
                dev = max(abs(p / mean - 1) for p in prog)
                worst = max(worst or 0.0, dev)
                if mean >= mib * MiB / 4:
                    worst_q = max(worst_q or 0.0, dev)
        time.sleep(0.2)


def run_qsd(tmp, aio):
    sock = os.path.join(tmp, "qsd.sock")
    args = ["qemu-storage-daemon"]
    for i, t in enumerate(tops):
        f = {"driver": "file", "filename": t, "cache": {"direct": True}}
        if aio:
            f["aio"] = aio
        args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": f"top{i}", "file": f})]
    p = subprocess.Popen(args + ["--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                                 "--monitor", "chardev=m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = Qmp(sock)
    t0 = time.perf_counter()
    for i in range(n):
        q.cmd("block-stream", **{"job-id": f"j{i}", "device": f"top{i}"})
    dt, worst = watch(q, t0)
    for i in range(n):
        q.cmd("blockdev-del", **{"node-name": f"top{i}"})
    dt = time.perf_counter() - t0
    q.cmd("quit")
    q.close()
    p.wait(600)
    return dt, worst


def run_sluice(tmp, _aio):
    p = subprocess.Popen([E["SLUICE"], "serve", "--runtime-dir", tmp, "-m", "0x3"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = Qmp(os.path.join(tmp, "sluice-qmp.sock"))
    for i, t in enumerate(tops):
        q.cmd("bdev_qcow2_open", name=f"drive{i}", filename=t, reactor=i % 2)
    t0 = time.perf_counter()
    for i in range(n):
        q.cmd("block-stream", **{"job-id": f"j{i}", "device": f"drive{i}"})
    dt, worst = watch(q, t0)
    for i in range(n):
        q.cmd("bdev_qcow2_delete", name=f"drive{i}")
    dt = time.perf_counter() - t0
    q.cmd("quit")
    q.close()
    p.wait(600)
    if "panicked" in p.stderr.read().decode(errors="replace"):
        raise RuntimeError("sluice panicked")
    return dt, worst


sides = [("sluice", run_sluice, None), ("qsd-threads", run_qsd, None), ("qsd-io_uring", run_qsd, "io_uring")]
t = {s[0]: [] for s in sides}
fair = {s[0]: [] for s in sides}
for r in range(int(E["ROUNDS"])):
    for name, f, aio in (sides if r % 2 == 0 else sides[::-1]):
        fresh()
        with tempfile.TemporaryDirectory(prefix="sl-many-") as tmp:
            dt, worst = f(tmp, aio)
        for b, tp in zip(bases, tops):
            c = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", tp, b])
            if c.returncode != 0:
                raise RuntimeError(f"{name}: {tp} differs from {b}")
        t[name].append(dt)
        fair[name].append(worst)


def fair_text(ws):
    def one(xs):
        xs = [x for x in xs if x is not None]
        return f"{max(xs) * 100:.0f}%" if xs else "n/a"
    return f"{one(w[1] for w in ws)} (from 2 MiB on: {one(w[0] for w in ws)})"


drop_caches()
floor = fio_disk(d, bases[0], n * mib * MiB, direct=True)
s = statistics.median(t["sluice"])
print(f"{n} streams x {mib} MiB at once: floor (fio, O_DIRECT) {floor:.3f}s")
for name in t:
    m = statistics.median(t[name])
    print(f"  {name:13} {m:.3f}s ({m / floor:.2f}x the floor, {m / s:.2f}x sluice), worst job "
          f"{fair_text(fair[name])} off the mean; runs {['%.3f' % x for x in t[name]]}")
PYEOF

#!/usr/bin/env bash
# Streaming a sparse chain whose virtual size dwarfs its data (issue 19):
# base.qcow2 of VSIZE (default 4T) holding three 64 MiB extents far apart
# (at 0, at half the size, near the end), top.qcow2 empty over it; the whole
# chain streamed into top, sluice and qemu-storage-daemon (its defaults,
# aio=threads, and aio=io_uring, its best here) side by side (rotating who
# goes first, caches dropped before each run), each result
# checked with `qemu-img compare` against base, timed until durable (the
# job plus closing the images). The floor: fio copying the allocated volume
# (read + write at once, 1 MiB, QD 16, fdatasync). sluice's peak RSS is
# reported (VmHWM).
# Goal: sluice within 2x of the floor, memory bounded.
#   scripts/bench/sparse_stream.sh            # 4 TiB, 2 rounds
#   VSIZE=1T ROUNDS=3 scripts/bench/sparse_stream.sh
#   CACHE='{"l2-cache-size": 1048576}' scripts/bench/sparse_stream.sh
# CACHE: qcow2 cache options (QEMU's) for both sides: sluice then opens the
# image with blockdev-add (its backing files take them too), QSD with its
# --blockdev (its backing file keeps QEMU's defaults).
set -euo pipefail
cd "$(dirname "$0")/../.."
VSIZE=${VSIZE:-4T}
ROUNDS=${ROUNDS:-2}
DISK_DIR=${DISK_DIR:-/var/tmp/sluice-bench-sparse}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
export SLUICE VSIZE ROUNDS DISK_DIR
exec "$PY" - <<'PYEOF'
import json, os, shutil, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, "scripts/bench")
from chainbench import MiB, Qmp, drop_caches, fio_disk, rotate, sh

E = os.environ
CACHE = json.loads(E.get("CACHE") or "{}")
d = E["DISK_DIR"]
os.makedirs(d, exist_ok=True)
base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
stamp = os.path.join(d, f"{E['VSIZE']}.done")
if not os.path.exists(stamp):
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, E["VSIZE"])
    size = json.loads(sh("qemu-img", "info", "--output=json", base))["virtual-size"]
    ext = [0, size // 2, size - 128 * MiB]
    src = os.path.join(d, "rand.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(64 * MiB))
    sh("qemu-io", "-f", "qcow2", *sum((["-c", f"write -s {src} {o} 64M"] for o in ext), []), base)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top + ".orig", E["VSIZE"])
    open(stamp, "w").close()
data = sum(e["length"] for e in json.loads(sh("qemu-img", "map", "--output=json", base)) if e["data"])


def fresh():
    shutil.copyfile(top + ".orig", top)
    drop_caches()


def run_qsd(tmp, aio="threads"):
    sock = os.path.join(tmp, "qsd.sock")
    p = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                          json.dumps({"driver": "qcow2", "node-name": "top", **CACHE,
                                      "file": {"driver": "file", "filename": top, "aio": aio}}),
                          "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = Qmp(sock)
    t0 = time.perf_counter()
    q.cmd("block-stream", **{"job-id": "j", "device": "top"})
    ev = q.wait("BLOCK_JOB_COMPLETED")
    q.cmd("quit")
    q.close()
    p.wait(600)
    return time.perf_counter() - t0, ev, None


def run_sluice(tmp):
    p = subprocess.Popen([E["SLUICE"], "serve", "--runtime-dir", tmp, "-m", "0x1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = Qmp(os.path.join(tmp, "sluice-qmp.sock"))
    if CACHE:
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "top"}, **CACHE,
              file={"driver": "file", "filename": top, "cache": {"direct": True}})
    else:
        q.cmd("bdev_qcow2_open", name="drive0", filename=top)
    t0 = time.perf_counter()
    q.cmd("block-stream", **{"job-id": "j", "device": "top" if CACHE else "drive0"})
    ev = q.wait("BLOCK_JOB_COMPLETED")
    if CACHE:
        q.cmd("blockdev-del", **{"node-name": "top"})
    else:
        q.cmd("bdev_qcow2_delete", name="drive0")
    rss = open(f"/proc/{p.pid}/status").read().split("VmHWM:")[1].split()[0]
    q.cmd("quit")
    q.close()
    p.wait(600)
    if "panicked" in p.stderr.read().decode(errors="replace"):
        raise RuntimeError("sluice panicked")
    return time.perf_counter() - t0, ev, int(rss)


sides = {"qsd": run_qsd, "qsd-uring": lambda tmp: run_qsd(tmp, "io_uring"), "sluice": run_sluice}
t = {k: [] for k in sides}
rss = []
for r in range(int(E["ROUNDS"])):
    for side in rotate(list(sides), r):
        fresh()
        with tempfile.TemporaryDirectory(prefix="sl-sparse-") as tmp:
            dt, ev, kb = sides[side](tmp)
        if "error" in ev["data"]:
            raise RuntimeError(f"{side}: {ev}")
        c = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", top, base])
        if c.returncode != 0:
            raise RuntimeError(f"{side}: the streamed image differs from base")
        if "backing-filename" in json.loads(sh("qemu-img", "info", "--output=json", top)):
            raise RuntimeError(f"{side}: top still has a backing file")
        t[side].append(dt)
        if kb:
            rss.append(kb)
drop_caches()
floor = fio_disk(d, base, data, direct=False)
q, u, s = statistics.median(t["qsd"]), statistics.median(t["qsd-uring"]), statistics.median(t["sluice"])
print(f"{E['VSIZE']} chain, {data // MiB} MiB of data, cache options {CACHE or 'default'}, load {os.getloadavg()[0]:.1f}: "
      f"qsd (aio=threads) {q:.3f}s, qsd (aio=io_uring) {u:.3f}s, sluice {s:.3f}s "
      f"(qsd/sluice {q / s:.1f}x, {u / s:.1f}x); "
      f"floor (fio copy of the data) {floor:.3f}s: sluice at {s / floor:.2f}x it (goal <= 2); "
      f"sluice peak RSS {max(rss) // 1024} MiB; runs qsd {['%.3f' % x for x in t['qsd']]} "
      f"qsd-uring {['%.3f' % x for x in t['qsd-uring']]} "
      f"sluice {['%.3f' % x for x in t['sluice']]}")
PYEOF

#!/usr/bin/env bash
# Mirror benchmark: sluice vs qemu-storage-daemon, side by side, on the same
# three-layer qcow2 chain (64 KiB clusters; base 60%, mid 20%, top 10% of the
# disk written in 1 MiB extents of random data), mirrored with drive-mirror
# sync=full onto a new qcow2 file, in the page cache and with O_DIRECT.
#
#   scripts/bench/mirror.sh                  # 1 GiB, both storages, 2 rounds
#   ROUNDS=4 STORAGE=direct scripts/bench/mirror.sh
#   STORAGE= ROUNDS=3 scripts/bench/mirror.sh   # the active mirror only (ACTIVE)
#
# Each round runs QSD with its defaults (aio=threads), QSD with aio=io_uring (its
# best here) and sluice, alternating who goes first, with the page cache
# dropped (sync; drop_caches) before each run. A run is timed until durable:
# drive-mirror, BLOCK_JOB_READY, block-job-complete, the job's end (the target
# released, which flushes and closes it), quit and the process's exit. The
# target is then checked with qemu-img compare against the chain.
# For each storage, fio measures what the disk needs for the same volume: the
# copied bytes read from the chain's base file and written to a scratch file at
# once (1 MiB, QD 16, O_DIRECT), and for the page cache the same plus fdatasync.
# ACTIVE=1 (default) also runs an active mirror (copy-mode write-blocking) of the
# chain (O_DIRECT) under fio's random 4 KiB writes at QD 16 through an NBD export
# of the source on each side: QSD with its defaults (aio=threads), QSD with
# aio=io_uring and sluice, ROUNDS rounds, the sides rotating so each goes first
# in turn, a fresh copy of top and the page cache dropped before every run.
# Each run: client write p99 idle (5 s), then while the mirror runs (20 s of
# fio, the mirror started 1 s in and completed after fio ends; write-blocking
# keeps copying each write to the target after READY; only the writes that
# completed after the mirror's command count, from fio's per-write log; both
# p99s nearest-rank over that log), whether the mirror converged (READY) under
# the load and when; the job completed, the daemon quit, the target compared
# with the written source (`qemu-img compare`) before the run counts. sluice uses drive-mirror; QSD blockdev-mirror onto a
# target made beforehand and added with its aio and cache.direct (drive-mirror
# would open it with QEMU's default aio). Printed: each run, then medians: each
# side's idle and during p99, its own ratio (goal <= 2x), and sluice's during
# p99 over the faster QSD's.
# SLUICE: a sluice binary to measure (default: build this tree).
# Results: a table on stdout; JSON lines in $OUT (default /tmp/bench-mirror.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${SIZE:-1}
STORAGE=${STORAGE-"pagecache direct"}
ROUNDS=${ROUNDS:-2}
ACTIVE=${ACTIVE:-1}
DISK_DIR=${DISK_DIR:-/var/tmp/sluice-bench-mirror}
CORES=${CORES:-0x1}
OUT=${OUT:-${TMPDIR:-/tmp}/bench-mirror.jsonl}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
export SLUICE SIZE STORAGE ROUNDS ACTIVE DISK_DIR CORES OUT
exec "$PY" - <<'PYEOF'
import json, os, shutil, statistics, subprocess, sys, tempfile, threading, time
sys.path.insert(0, "scripts/bench")
from chainbench import (MiB, clat_log, drop_caches, fio_disk, make_chain, p99_us, rotate, sh, start_qsd,
                        start_sluice, stop)

E = os.environ


def copied_bytes(top):
    return sum(e["length"] for e in json.loads(sh("qemu-img", "map", "--output=json", top)) if e["data"])


def mirror(q, p, device, target, close=None):
    """drive-mirror to a new image, READY, complete, the job's end, the
    images closed (QSD: quit and its exit; sluice: the device, now on the
    target, closed with bdev_qcow2_delete, as stream.sh does); returns
    (ready_s, done_s, durable_s) from the command."""
    t0 = time.perf_counter()
    q.cmd("drive-mirror", **{"job-id": "m0", "device": device, "target": target, "sync": "full",
                             "format": "qcow2"})
    q.wait("BLOCK_JOB_READY")
    tr = time.perf_counter() - t0
    q.cmd("block-job-complete", device="m0")
    ev = q.wait("BLOCK_JOB_COMPLETED")
    if "error" in ev["data"]:
        raise RuntimeError(f"the job failed: {ev}")
    td = time.perf_counter() - t0
    if close:
        q.cmd("bdev_qcow2_delete", name=close)  # flushes and closes the target
        tc = time.perf_counter() - t0
    q.cmd("quit")
    q.close()
    p.wait(120)  # closing the images flushes them
    return tr, td, tc if close else time.perf_counter() - t0


def run_qsd(names, direct, target, tmp, aio):
    p, q = start_qsd(names, direct, tmp, aio=aio)
    try:
        return mirror(q, p, "top", target)
    finally:
        p.wait(30)


def run_sluice(names, direct, target, tmp):
    p, q = start_sluice(E["SLUICE"], names, direct, tmp, E["CORES"])
    try:
        return mirror(q, p, "drive0", target, close="drive0")
    finally:
        p.wait(30)


def fio_writes(uri, secs, res, log=()):
    out = sh("fio", "--output-format=json", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--time_based", f"--runtime={secs}", "--size=1G", *log)
    j = json.loads(out[out.index("{"):])["jobs"][0]["write"]  # the nbd engine prints a line first
    res.append(j["iops"])


def active_sluice(chain, tmp, target):
    """sluice with the chain (O_DIRECT), drive0 exported writable over NBD;
    returns (p, q, uri, start the mirror)."""
    p, q = start_sluice(E["SLUICE"], chain, True, tmp, E["CORES"])
    sock = os.path.join(tmp, "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
    q.cmd("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "drive0"})

    def go():
        q.cmd("drive-mirror", **{"job-id": "a0", "device": "drive0", "target": target, "sync": "full",
                                 "format": "qcow2", "copy-mode": "write-blocking"})
    return p, q, f"nbd+unix:///drive0?socket={sock}", go


def active_qsd(chain, tmp, target, aio):
    """QSD with the chain (cache.direct=on, aio as given), top exported
    writable over NBD; the target made beforehand and added with the same aio
    and cache (drive-mirror would open it with QEMU's default aio), mirrored
    with blockdev-mirror; returns (p, q, uri, start the mirror)."""
    sock = os.path.join(tmp, "nbd.sock")
    p, q = start_qsd(chain, True, tmp, aio=aio, extra=[
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=top,name=top,writable=on"])
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", target, f"{E['SIZE']}G")
    q.cmd("blockdev-add", driver="qcow2", cache={"direct": True}, **{
        "node-name": "tgt", "file": {"driver": "file", "filename": target, "aio": aio,
                                     "cache": {"direct": True, "no-flush": False}}})

    def go():
        q.cmd("blockdev-mirror", **{"job-id": "a0", "device": "top", "target": "tgt", "sync": "full",
                                    "copy-mode": "write-blocking"})
    return p, q, f"nbd+unix:///top?socket={sock}", go


def active(who, names, tmp):
    """Client 4 KiB random writes at QD 16 through NBD: p99 idle, then while a
    write-blocking mirror of the chain runs; whether it converged under the
    load. Raises unless the target then reads as the written source."""
    target = os.path.join(tmp, "active.qcow2")
    # The client writes into top: a copy of it, the chain stays as made.
    top = os.path.join(tmp, "top.qcow2")
    shutil.copyfile(names[2], top)
    chain = [names[0], names[1], top]
    drop_caches()
    if who == "sluice":
        p, q, uri, go = active_sluice(chain, tmp, target)
    else:  # QEMU's default aio=threads, and io_uring (its best here)
        p, q, uri, go = active_qsd(chain, tmp, target, "threads" if who == "qsd-default" else "io_uring")
    try:
        idle = []
        idle_log = os.path.join(tmp, "idle")
        fio_writes(uri, 5, idle, (f"--write_lat_log={idle_log}", "--log_unix_epoch=1"))
        idle_p99 = p99_us(ns for _, ns in clat_log(idle_log))
        busy = []
        log = os.path.join(tmp, "lat")  # every write's completion time: the window starts with the mirror
        t = threading.Thread(target=fio_writes,
                             args=(uri, 20, busy, (f"--write_lat_log={log}", "--log_unix_epoch=1")))
        t.start()
        time.sleep(1)
        t0 = time.time()  # wall clock, as fio's log
        go()
        q.wait("BLOCK_JOB_READY", timeout=120)
        ready = time.time() - t0
        converged_under_load = t.is_alive()
        t.join()
        if not busy:
            raise RuntimeError(f"{who}: fio's writes during the mirror failed")
        lat = [(tc, ns) for tc, ns in clat_log(log) if tc >= t0]
        if not lat:
            raise RuntimeError(f"{who}: no write completed while the mirror ran")
        q.cmd("block-job-complete", device="a0")
        ev = q.wait("BLOCK_JOB_COMPLETED")
        if "error" in ev["data"]:
            raise RuntimeError(f"{who}: active mirror failed: {ev}")
        if who == "sluice":
            q.cmd("block-export-del", id="e0")
        stop(p, q, who)  # closing the images flushes them
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(30)
    # The pivot moved the device onto the target: it holds everything written,
    # as does the source (write-blocking writes both).
    c = subprocess.run(["qemu-img", "compare", "-q", top, target], capture_output=True, text=True)
    if c.returncode != 0:
        raise RuntimeError(f"{who}: active mirror: the target differs from the source: {c.stdout}{c.stderr}")
    mirror_p99 = p99_us(ns for _, ns in lat)
    return {"idle_p99_us": idle_p99, "idle_iops": idle[0], "mirror_p99_us": mirror_p99,
            "mirror_iops": len(lat) / max(max(tc for tc, _ in lat) - t0, 1e-3), "mirror_writes": len(lat),
            "ratio": mirror_p99 / idle_p99, "ready_s": ready,
            "converged_under_load": converged_under_load}


out = open(E["OUT"], "a")
gib = int(E["SIZE"])
d = E["DISK_DIR"]
names = make_chain(d, gib)
copied = copied_bytes(names[2])
print(f"{gib} GiB chain, {copied / MiB:.0f} MiB allocated; drive-mirror sync=full onto a new qcow2; "
      f"load {os.getloadavg()[0]:.1f}")
print(f"{'storage':>9} {'round':>5} {'first':>11} {'qsd dft':>8} {'qsd urg':>8} {'sluice':>8} "
      f"{'ratio':>6}  {'fio s':>6} {'vs disk':>7}   (durable seconds; ratio: sluice / the faster QSD)")
for storage in E["STORAGE"].split():
    direct = storage == "direct"
    drop_caches()
    tf = fio_disk(d, names[0], copied, direct)
    for r in range(int(E["ROUNDS"])):
        sides = ["qsd-default", "qsd-uring", "sluice"]
        order = sides if r % 2 == 0 else list(reversed(sides))
        t = {}
        for who in order:
            with tempfile.TemporaryDirectory(prefix="sl-mbench-", dir=d) as tmp:
                target = os.path.join(tmp, "copy.qcow2")
                drop_caches()
                if who == "sluice":
                    t[who] = run_sluice(names, direct, target, tmp)
                else:  # QEMU's default aio=threads, and io_uring (its best here)
                    t[who] = run_qsd(names, direct, target, tmp, "threads" if who == "qsd-default" else "io_uring")
                c = subprocess.run(["qemu-img", "compare", "-U", names[2], target], capture_output=True, text=True)
                if c.returncode != 0:
                    raise SystemExit(f"{who}: target differs: {c.stdout}{c.stderr}")
        qd = min(t["qsd-default"][2], t["qsd-uring"][2])
        sd = t["sluice"][2]
        rec = {"chain_gib": gib, "storage": storage, "round": r, "first": order[0], "copied": copied,
               "runs": t, "ratio": sd / qd, "fio_s": tf, "vs_disk": sd / tf}
        print(f"{storage:>9} {r:>5} {order[0]:>11} {t['qsd-default'][2]:>8.2f} {t['qsd-uring'][2]:>8.2f} "
              f"{sd:>8.2f} {sd / qd:>6.2f}  {tf:>6.2f} {sd / tf:>6.2f}x", flush=True)
        out.write(json.dumps(rec) + "\n")
print("goal: ratio <= 0.5 (2x faster than QSD), vs disk <= 1.2x")
if E["ACTIVE"] == "1":
    print(f"active mirror (copy-mode write-blocking, O_DIRECT) under fio randwrite 4k QD16 through NBD; "
          f"client write p99 in us; load {os.getloadavg()[0]:.1f}")
    print(f"{'round':>5} {'side':>11} {'idle p99':>9} {'mirror p99':>10} {'ratio':>6} {'idle IOPS':>9} "
          f"{'mirror IOPS':>11} {'READY s':>7}  converged")
    sides = ["qsd-default", "qsd-uring", "sluice"]
    runs = {k: [] for k in sides}
    for r in range(int(E["ROUNDS"])):
        for who in rotate(sides, r):
            with tempfile.TemporaryDirectory(prefix="sl-mbench-", dir=d) as tmp:
                a = active(who, names, tmp)  # the target compared before it counts
            runs[who].append(a)
            print(f"{r:>5} {who:>11} {a['idle_p99_us']:>9.0f} {a['mirror_p99_us']:>10.0f} {a['ratio']:>6.2f} "
                  f"{a['idle_iops']:>9.0f} {a['mirror_iops']:>11.0f} {a['ready_s']:>7.1f}  "
                  f"{'under the load' if a['converged_under_load'] else 'NOT under the load'}", flush=True)
            out.write(json.dumps({"active": who, "round": r, **a}) + "\n")
    med = {k: {m: statistics.median(a[m] for a in v) for m in ("idle_p99_us", "mirror_p99_us", "ratio")}
           for k, v in runs.items()}
    best = min(("qsd-default", "qsd-uring"), key=lambda k: med[k]["mirror_p99_us"])
    s_, b_ = med["sluice"], med[best]
    print(f"medians of {E['ROUNDS']} round(s): sluice p99 idle {s_['idle_p99_us']:.0f} us, during the mirror "
          f"{s_['mirror_p99_us']:.0f} us ({s_['ratio']:.2f}x its idle, goal <= 2x); the faster QSD ({best}) "
          f"{b_['idle_p99_us']:.0f} / {b_['mirror_p99_us']:.0f} us ({b_['ratio']:.2f}x); "
          f"sluice / QSD during the mirror: {s_['mirror_p99_us'] / b_['mirror_p99_us']:.2f}")
    out.write(json.dumps({"active_medians": med, "qsd_best": best,
                          "mirror_p99_ratio": s_["mirror_p99_us"] / b_["mirror_p99_us"]}) + "\n")
PYEOF

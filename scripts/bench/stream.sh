#!/usr/bin/env bash
# Streaming benchmark: sluice vs qemu-storage-daemon, side by side, on the same
# three-layer qcow2 chains (64 KiB clusters; base 60%, mid 20%, top 10% of the
# disk written in 1 MiB extents of random data), same cache mode. QSD runs with
# its defaults (aio=threads) and with aio=io_uring (its best here); the ratio is
# taken against the faster. ROUNDS (1) rounds, the sides rotating so each goes
# first in turn; the pristine top restored and caches dropped before every run;
# each result checked (`qemu-img compare` against the pristine chain, `qemu-img
# check`) before its time counts; medians.
#
#   scripts/bench/stream.sh                 # 1 GiB and 4 GiB, every storage, both modes
#   SIZES="1" STORAGE="pagecache" scripts/bench/stream.sh
#   SIZES= ROUNDS=3 scripts/bench/stream.sh   # the client p99 part only (LATENCY)
#
# Storage: pagecache (files, page cache), direct (files, O_DIRECT), tmpfs (chain in
# /dev/shm, page cache). Modes: full (whole chain) and base (base-node=base).
# For O_DIRECT it also measures with fio what the disk does for the same read +
# write volume (reads from the chain's files and writes to a scratch file at once).
# For the page cache it measures the disk floor of a durable stream: writing the
# copied volume to a new file and fdatasync (sluice makes the copy durable before
# the header drops the backing file; QSD does not flush).
# LATENCY=1 (default) also measures client 4 KiB random-read p99 at QD 1 over
# NBD (fio's nbd engine; each daemon exports the chain's top, 1 GiB chain, page
# cache) idle and during a full stream: QSD with its defaults (aio=threads), QSD
# with aio=io_uring and sluice, ROUNDS rounds, the sides rotating, the pristine
# top restored and caches dropped before every run, the streamed top compared
# with the chain (and checked) before the run counts. One fio run across each
# stream, its per-read log cut in two: idle, the reads that completed in the 5 s
# before block-stream; during, those from block-stream to BLOCK_JOB_COMPLETED,
# however long each side's stream lasts. Printed: each run (with a
# note when fewer than 1000 reads fell inside the stream), then each side's
# median idle p99, during p99 and their ratio (sluice's goal: <= 1.5x), and
# sluice's during p99 over the faster QSD's.
# PARK_US: sluice's --park-after-us (default 500; 50 lets the reactor park while it
# only waits for buffered io_uring work done by the kernel's io-wq threads).
# sluice runs each stream twice: by default (the copy is made durable before the
# header drops the backing file) and with block-stream's x-durable=false ("nf":
# no flush, as QEMU's stream; still safe against a killed process, see
# scripts/bench/stream_kill_after_complete.sh). "OK (nf)": only the nf run meets the goal.
# SLUICE: a sluice binary to measure (default: build this tree), e.g. an older
# build for an A/B (scripts/bench/ab.sh covers the data path).
# Results: a table on stdout; JSON lines in $OUT (default bench-stream.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${SIZES-"1 4"}
STORAGE=${STORAGE:-"pagecache direct tmpfs"}
MODES=${MODES:-"full base"}
ROUNDS=${ROUNDS:-1}
LATENCY=${LATENCY:-1}
DISK_DIR=${DISK_DIR:-/var/tmp/sluice-bench}
TMPFS_DIR=${TMPFS_DIR:-/dev/shm/sluice-bench}
CORES=${CORES:-0x1}
OUT=${OUT:-bench-stream.jsonl}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
export SLUICE SIZES STORAGE MODES ROUNDS LATENCY DISK_DIR TMPFS_DIR CORES OUT
exec "$PY" - <<'PYEOF'
import json, os, shutil, signal, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, "scripts/bench")
from chainbench import Qmp, clat_log, drop_caches, make_chain, p99_us, rotate, sh, start_qsd, stop

E = os.environ
MiB = 1 << 20


def fresh_top(names):
    shutil.copyfile(names[2] + ".orig", names[2])


def check_top(names, who):
    """Raises unless the streamed top reads as the pristine chain (top.orig
    over mid and base) and checks clean."""
    c = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", names[2], names[2] + ".orig"],
                       capture_output=True, text=True)
    if c.returncode != 0:
        raise RuntimeError(f"{who}: the streamed top differs from the chain: {c.stdout}{c.stderr}")
    c = subprocess.run(["qemu-img", "check", "-q", names[2]], capture_output=True, text=True)
    if c.returncode not in (0, 3):  # 3: leaked clusters only
        raise RuntimeError(f"{who}: qemu-img check: {c.stdout}{c.stderr}")


def copied_bytes(names, mode):
    """Bytes a stream copies: allocated above base (or anywhere) and not in top."""
    top_map = json.loads(sh("qemu-img", "map", "--output=json", names[2]))
    n = 0
    for e in top_map:
        if not e["data"] or e["depth"] == 0:
            continue
        if mode == "base" and e["depth"] >= 2:
            continue
        n += e["length"]
    return n


def run_qsd(names, mode, direct, tmp, aio="threads"):
    sock = os.path.join(tmp, "qsd.sock")
    args = ["qemu-storage-daemon"]
    for n, p in zip(("base", "mid", "top"), names):
        f = {"driver": "file", "node-name": f"{n}-file", "filename": p, "aio": aio,
             "cache": {"direct": direct, "no-flush": False}}
        args += ["--blockdev", json.dumps(f)]
        back = {"base": None, "mid": "base", "top": "mid"}[n]
        args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": n, "file": f"{n}-file", "backing": back})]
    args += ["--chardev", f"socket,id=qmp0,path={sock},server=on,wait=off", "--monitor", "chardev=qmp0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        q = Qmp(sock)
        kw = {"job-id": "job0", "device": "top"}
        if mode == "base":
            kw["base-node"] = "base"
        t0 = time.perf_counter()
        q.cmd("block-stream", **kw)
        ev = q.wait("BLOCK_JOB_COMPLETED")
        dt = time.perf_counter() - t0
        if "error" in ev["data"]:
            raise RuntimeError(f"the job failed: {ev}")
        q.cmd("quit")
        q.close()
        p.wait(120)  # closing the images flushes them
        durable = time.perf_counter() - t0
    finally:
        p.wait(30)
    return dt, durable


def start_sluice(tmp):
    p = subprocess.Popen([E["SLUICE"], "serve", "--runtime-dir", tmp, "-m", E["CORES"],
                          "--park-after-us", E.get("PARK_US", "500")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, Qmp(os.path.join(tmp, "sluice-qmp.sock"))


def open_sluice(q, names, direct):
    q.cmd("bdev_qcow2_open", node_name="base", filename=names[0], no_backing=True, direct=direct)
    q.cmd("bdev_qcow2_open", node_name="mid", filename=names[1], backing="base", direct=direct)
    q.cmd("bdev_qcow2_open", name="drive0", node_name="top", filename=names[2], backing="mid", direct=direct)


def run_sluice(names, mode, direct, tmp, durable=True):
    p, q = start_sluice(tmp)
    try:
        open_sluice(q, names, direct)
        kw = {"device": "drive0"}
        if not durable:
            kw["x-durable"] = False
        if mode == "base":
            kw["base-node"] = "base"
        t0 = time.perf_counter()
        q.cmd("block-stream", **kw)
        ev = q.wait("BLOCK_JOB_COMPLETED")
        dt = time.perf_counter() - t0
        if "error" in ev["data"]:
            raise RuntimeError(f"the job failed: {ev}")
        q.cmd("bdev_qcow2_delete", name="drive0")  # flush (already done by the job) and trim
        durable = time.perf_counter() - t0
        q.cmd("quit")
        q.close()
    finally:
        p.wait(30)
    return dt, durable


def fio_disk(d, src, nbytes):
    """Seconds the disk needs to read and write nbytes at once (O_DIRECT, 1 MiB, QD 16)."""
    scratch = os.path.join(d, "fio-scratch")
    out = sh("fio", "--output-format=json", "--direct=1", "--ioengine=io_uring", "--bs=1M", "--iodepth=16",
             # io_size, not size: a size past the file's end makes fio lay the file out anew.
             "--name=r", "--rw=read", f"--filename={src}",
             f"--size={os.path.getsize(src)}", f"--io_size={nbytes}",
             "--name=w", "--rw=write", f"--filename={scratch}", f"--size={nbytes}")
    os.unlink(scratch)
    jobs = json.loads(out)["jobs"]
    return max(j["job_runtime"] for j in jobs) / 1000.0


def write_floor(d, nbytes):
    """Seconds to write nbytes to a new file through the page cache and make them
    durable (fdatasync): the least a durable buffered stream of that volume needs."""
    scratch = os.path.join(d, "floor-scratch")
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[:min(left, MiB)])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(scratch)
    return dt


IDLE_S = 5  # seconds of reads before the stream


def reads_across_job(uri, q, tmp, start):
    """fio's 4 KiB random reads at QD 1 through uri, one run across the job:
    IDLE_S seconds idle (after a second to connect), then start() (the job's
    command) until its BLOCK_JOB_COMPLETED; fio then stopped (SIGINT makes it
    finish its log). Every read's completion time (epoch ms) and latency come
    from fio's per-read log, so each window holds exactly the reads that
    completed in it. Returns ({idle,stream}_{p99_us,iops,reads}, stream_s)."""
    log = os.path.join(tmp, "lat")
    f = subprocess.Popen(["fio", "--output-format=json", "--name=lat", "--ioengine=nbd", f"--uri={uri}",
                          "--rw=randread", "--bs=4k", "--iodepth=1", "--time_based", "--runtime=3600",
                          "--size=1G", f"--write_lat_log={log}", "--log_unix_epoch=1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1 + IDLE_S)
        if f.poll() is not None:
            raise RuntimeError(f"fio through {uri} ended early: {f.communicate()[1][-2000:]}")
        t0 = time.time()  # wall clock, as fio's log and the event's timestamp
        start()
        ev = q.wait("BLOCK_JOB_COMPLETED")
    finally:
        if f.poll() is None:
            f.send_signal(signal.SIGINT)
        f.communicate(timeout=60)
    if "error" in ev["data"]:
        raise RuntimeError(f"the stream failed: {ev}")
    t1 = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
    lat = clat_log(log)
    idle = [ns for t, ns in lat if t0 - IDLE_S <= t < t0]
    busy = [ns for t, ns in lat if t0 <= t <= t1]
    if not idle or not busy:
        raise RuntimeError(f"no reads completed {'idle' if not idle else 'during the stream'} ({t1 - t0:.2f}s)")
    return {"idle_p99_us": p99_us(idle), "idle_iops": len(idle) / IDLE_S, "idle_reads": len(idle),
            "stream_p99_us": p99_us(busy), "stream_iops": len(busy) / max(t1 - t0, 1e-3),
            "stream_reads": len(busy)}, t1 - t0


def latency(who, names, tmp):
    """Client 4 KiB random reads at QD 1 over an NBD export of the chain's top
    (page cache): p99 idle, then during a full stream. Raises unless the
    streamed top then reads as the pristine chain. "During": the reads that
    completed from block-stream until its BLOCK_JOB_COMPLETED."""
    fresh_top(names)
    drop_caches()
    sock = os.path.join(tmp, "nbd.sock")
    if who == "sluice":
        p, q = start_sluice(tmp)
        open_sluice(q, names, False)
        q.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
        uri, kw = f"nbd+unix:///drive0?socket={sock}", {"device": "drive0"}
    else:  # QEMU's default aio=threads, and io_uring (its best here)
        p, q = start_qsd(names, False, tmp, aio="threads" if who == "qsd-default" else "io_uring", extra=[
            "--nbd-server", f"addr.type=unix,addr.path={sock}", "--export", "type=nbd,id=e0,node-name=top,name=top"])
        uri, kw = f"nbd+unix:///top?socket={sock}", {"job-id": "job0", "device": "top"}
    try:
        lat, dt = reads_across_job(uri, q, tmp, lambda: q.cmd("block-stream", **kw))
        if who == "sluice":
            q.cmd("block-export-del", id="e0")
            q.cmd("bdev_qcow2_delete", name="drive0")  # flush (already done by the job) and trim
        stop(p, q, who)  # closing the images flushes them
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(30)
    check_top(names, who)
    return {**lat, "ratio": lat["stream_p99_us"] / lat["idle_p99_us"], "stream_s": dt}


results = []
out = open(E["OUT"], "a")
print(f"{'chain':>6} {'storage':>9} {'mode':>5} {'copied':>9} {'qsd dft':>8} {'qsd s':>8} {'sluice s':>9} {'ratio':>6} "
      f"{'nf s':>7} {'ratio':>6} {'goal':>6}  {'durable: qsd s':>14} {'sluice s':>9} {'ratio':>6}  notes")
print(f"(qsd dft: QSD's defaults, aio=threads; qsd s: the faster of that and aio=io_uring; medians of "
      f"{E['ROUNDS']} round(s), each result compared with the chain; load {os.getloadavg()[0]:.1f})")
for gib in [int(x) for x in E["SIZES"].split()]:
    for storage in E["STORAGE"].split():
        d = E["TMPFS_DIR"] if storage == "tmpfs" else E["DISK_DIR"]
        names = make_chain(d, gib, pristine=("top",))
        direct = storage == "direct"
        for mode in E["MODES"].split():
            fresh_top(names)
            copied = copied_bytes(names, mode)
            sides = {"qsd-default": lambda tmp: run_qsd(names, mode, direct, tmp, "threads"),
                     "qsd-uring": lambda tmp: run_qsd(names, mode, direct, tmp, "io_uring"),
                     "sluice": lambda tmp: run_sluice(names, mode, direct, tmp),
                     "sluice-nf": lambda tmp: run_sluice(names, mode, direct, tmp, durable=False)}
            runs = {k: [] for k in sides}
            for r in range(int(E["ROUNDS"])):
                for who in rotate(list(sides), r):
                    with tempfile.TemporaryDirectory(prefix="sl-bench-") as tmp:
                        fresh_top(names)
                        drop_caches()
                        res = sides[who](tmp)
                    check_top(names, who)
                    runs[who].append(res)
            fresh_top(names)
            med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                   for k, v in runs.items()}
            best = min(("qsd-default", "qsd-uring"), key=lambda k: med[k][0])
            tq, tqd = med[best]
            tqt = med["qsd-default"][0]
            ts, tsd = med["sluice"]
            tn = med["sluice-nf"][0]
            ratio = ts / tq
            goal = 1 / 1.3 if direct else 1 / 3
            notes = ""
            rec = {"chain_gib": gib, "storage": storage, "mode": mode, "copied": copied, "qsd_s": tq,
                   "qsd_best": best, "qsd_default_s": tqt, "runs": runs,
                   "sluice_s": ts, "ratio": ratio, "goal": goal, "qsd_durable_s": tqd, "sluice_durable_s": tsd,
                   "sluice_no_flush_s": tn, "no_flush_ratio": tn / tq}
            if direct:
                drop_caches()
                tf = fio_disk(d, names[0], copied)
                rec["fio_s"] = tf
                rec["disk_fraction"] = tf / ts
                notes = f"fio {tf:.2f}s: sluice does {100 * tf / ts:.0f}% of the disk (goal 90%)"
            elif storage == "pagecache":
                drop_caches()
                tw = write_floor(d, copied)
                rec["write_floor_s"] = tw
                notes = f"disk floor (write+fdatasync of the copied volume) {tw:.2f}s: sluice at {ts / tw:.2f}x it"
            verdict = "OK" if ratio <= goal else ("OK (nf)" if tn / tq <= goal else "MISS")
            print(f"{gib:>5}G {storage:>9} {mode:>5} {copied / MiB:>7.0f}Mi {tqt:>8.3f} {tq:>8.3f} {ts:>9.3f} {ratio:>6.2f} "
                  f"{tn:>7.3f} {tn / tq:>6.2f} {goal:>6.2f}  {tqd:>14.3f} {tsd:>9.3f} {tsd / tqd:>6.2f}  {verdict} {notes}",
                  flush=True)
            out.write(json.dumps(rec) + "\n")
if E["LATENCY"] == "1":
    names = make_chain(E["DISK_DIR"], 1, pristine=("top",))
    print(f"client 4 KiB randread p99 (us) over NBD, QD 1, idle and during a full stream of the 1 GiB chain "
          f"(page cache); load {os.getloadavg()[0]:.1f}")
    print(f"{'round':>5} {'side':>11} {'idle p99':>9} {'during':>7} {'ratio':>6} {'idle IOPS':>9} {'during IOPS':>11} "
          f"{'stream s':>8}  notes")
    sides = ["qsd-default", "qsd-uring", "sluice"]
    runs = {k: [] for k in sides}
    for r in range(int(E["ROUNDS"])):
        for who in rotate(sides, r):
            with tempfile.TemporaryDirectory(prefix="sl-bench-") as tmp:
                a = latency(who, names, tmp)  # the streamed top compared before it counts
            runs[who].append(a)
            note = f"only {a['stream_reads']} reads during the stream" if a["stream_reads"] < 1000 else ""
            print(f"{r:>5} {who:>11} {a['idle_p99_us']:>9.0f} {a['stream_p99_us']:>7.0f} {a['ratio']:>6.2f} "
                  f"{a['idle_iops']:>9.0f} {a['stream_iops']:>11.0f} {a['stream_s']:>8.2f}  {note}", flush=True)
            out.write(json.dumps({"latency": who, "round": r, **a}) + "\n")
    fresh_top(names)
    med = {k: {m: statistics.median(a[m] for a in v) for m in ("idle_p99_us", "stream_p99_us", "ratio")}
           for k, v in runs.items()}
    best = min(("qsd-default", "qsd-uring"), key=lambda k: med[k]["stream_p99_us"])
    for who in sides:
        m = med[who]
        print(f"{who:>11}: p99 idle {m['idle_p99_us']:.0f} us, during the stream {m['stream_p99_us']:.0f} us: "
              f"{m['ratio']:.2f}x" + (" (goal <= 1.5x)" if who == "sluice" else ""))
    ratio_q = med["sluice"]["stream_p99_us"] / med[best]["stream_p99_us"]
    print(f"medians of {E['ROUNDS']} round(s); sluice / the faster QSD ({best}) during the stream: {ratio_q:.2f}")
    out.write(json.dumps({"latency_medians": med, "qsd_best": best, "stream_p99_ratio": ratio_q}) + "\n")
PYEOF

#!/usr/bin/env bash
# Mirror benchmark: sluice vs qemu-storage-daemon, side by side, on the same
# three-layer qcow2 chain (64 KiB clusters; base 60%, mid 20%, top 10% of the
# disk written in 1 MiB extents of random data), mirrored with drive-mirror
# sync=full onto a new qcow2 file, in the page cache and with O_DIRECT.
#
#   scripts/bench/mirror.sh                  # 1 GiB, both storages, 2 rounds
#   ROUNDS=4 STORAGE=direct scripts/bench/mirror.sh
#
# Each round runs both daemons, alternating who goes first, with the page cache
# dropped (sync; drop_caches) before each run. A run is timed until durable:
# drive-mirror, BLOCK_JOB_READY, block-job-complete, the job's end (the target
# released, which flushes and closes it), quit and the process's exit. The
# target is then checked with qemu-img compare against the chain.
# For each storage, fio measures what the disk needs for the same volume: the
# copied bytes read from the chain's base file and written to a scratch file at
# once (1 MiB, QD 16, O_DIRECT), and for the page cache the same plus fdatasync.
# ACTIVE=1 (default) also runs an active mirror (copy-mode write-blocking) of the
# chain under fio's random 4 KiB writes at QD 16 through NBD: client write p99
# idle and while the mirror runs, whether the mirror converged (READY) under
# the load, and the time it took.
# SLUICE: a sluice binary to measure (default: build this tree).
# Results: a table on stdout; JSON lines in $OUT (default /tmp/bench-mirror.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${SIZE:-1}
STORAGE=${STORAGE:-"pagecache direct"}
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
import json, os, random, shutil, subprocess, tempfile, threading, time
from qemu.qmp.legacy import QEMUMonitorProtocol

E = os.environ
MiB = 1 << 20


def sh(*a, **kw):
    return subprocess.run([str(x) for x in a], check=True, capture_output=True, text=True, **kw).stdout


def make_chain(d, gib):
    """base/mid/top.qcow2 in d (kept between runs)."""
    os.makedirs(d, exist_ok=True)
    stamp = os.path.join(d, f"chain-{gib}G.done")
    names = [os.path.join(d, f"{n}-{gib}G.qcow2") for n in ("base", "mid", "top")]
    if os.path.exists(stamp):
        return names
    rnd = random.Random(gib)
    srcs = []
    for i in range(8):
        p = os.path.join(d, f"rand{i}.bin")
        with open(p, "wb") as f:
            f.write(os.urandom(MiB))
        srcs.append(p)
    extents = gib * 1024
    for i, (p, frac) in enumerate(zip(names, (0.6, 0.2, 0.1))):
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
        if i:
            args += ["-b", names[i - 1], "-F", "qcow2"]
        sh(*args, p, f"{gib}G")
        chosen = sorted(rnd.sample(range(extents), int(extents * frac)))
        for k in range(0, len(chosen), 256):
            cmds = []
            for e in chosen[k:k + 256]:
                cmds += ["-c", f"write -q -s {srcs[rnd.randrange(8)]} {e * MiB} {MiB}"]
            sh("qemu-io", "-f", "qcow2", *cmds, p)
    open(stamp, "w").close()
    return names


def copied_bytes(top):
    return sum(e["length"] for e in json.loads(sh("qemu-img", "map", "--output=json", top)) if e["data"])


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"(cannot drop caches: {e})")


class Qmp:
    def __init__(self, path):
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        self.q = QEMUMonitorProtocol(path)
        self.q.connect(negotiate=True)

    def cmd(self, c, **a):
        r = self.q.cmd_raw(c, a)
        if "error" in r:
            raise RuntimeError(f"{c} {a}: {r['error']}")
        return r["return"]

    def close(self):
        try:
            self.q.close()
        except Exception:
            pass

    def wait(self, name, timeout=3600):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                ev = self.q.pull_event(wait=1.0)
            except Exception:
                ev = None
            if ev and ev["event"] == name:
                return ev
        raise RuntimeError(f"no {name}")


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
    assert "error" not in ev["data"], ev
    td = time.perf_counter() - t0
    if close:
        q.cmd("bdev_qcow2_delete", name=close)  # flushes and closes the target
        tc = time.perf_counter() - t0
    q.cmd("quit")
    q.close()
    p.wait(120)  # closing the images flushes them
    return tr, td, tc if close else time.perf_counter() - t0


def run_qsd(names, direct, target, tmp):
    sock = os.path.join(tmp, "qsd.sock")
    args = ["qemu-storage-daemon"]
    for n, p in zip(("base", "mid", "top"), names):
        f = {"driver": "file", "node-name": f"{n}-file", "filename": p, "aio": "io_uring",
             "cache": {"direct": direct, "no-flush": False}}
        args += ["--blockdev", json.dumps(f)]
        back = {"base": None, "mid": "base", "top": "mid"}[n]
        args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": n, "file": f"{n}-file", "backing": back})]
    args += ["--chardev", f"socket,id=qmp0,path={sock},server=on,wait=off", "--monitor", "chardev=qmp0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return mirror(Qmp(sock), p, "top", target)
    finally:
        p.wait(30)


def start_sluice(tmp):
    p = subprocess.Popen([E["SLUICE"], "serve", "--runtime-dir", tmp, "-m", E["CORES"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, Qmp(os.path.join(tmp, "sluice-qmp.sock"))


def open_sluice(q, names, direct):
    q.cmd("bdev_qcow2_open", node_name="base", filename=names[0], no_backing=True, direct=direct)
    q.cmd("bdev_qcow2_open", node_name="mid", filename=names[1], backing="base", direct=direct)
    q.cmd("bdev_qcow2_open", name="drive0", node_name="top", filename=names[2], backing="mid", direct=direct)


def run_sluice(names, direct, target, tmp):
    p, q = start_sluice(tmp)
    try:
        open_sluice(q, names, direct)
        return mirror(q, p, "drive0", target, close="drive0")
    finally:
        p.wait(30)


def fio_disk(d, src, nbytes, direct):
    """Seconds the disk needs to read and write nbytes at once (1 MiB, QD 16),
    with fdatasync at the end of the write in the page cache."""
    scratch = os.path.join(d, "fio-scratch")
    flags = ["--direct=1"] if direct else ["--direct=0", "--end_fsync=1"]
    drop_caches()
    out = sh("fio", "--output-format=json", *flags, "--ioengine=io_uring", "--bs=1M", "--iodepth=16",
             "--name=r", "--rw=read", f"--filename={src}",
             f"--size={os.path.getsize(src)}", f"--io_size={nbytes}",
             "--name=w", "--rw=write", f"--filename={scratch}", f"--size={nbytes}")
    os.unlink(scratch)
    return max(j["job_runtime"] for j in json.loads(out)["jobs"]) / 1000.0


def fio_writes(uri, secs, res):
    out = sh("fio", "--output-format=json", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--time_based", f"--runtime={secs}", "--size=1G")
    j = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    res.append((j["clat_ns"]["percentile"]["99.000000"] / 1000.0, j["iops"]))


def active(names, tmp):
    """Client 4 KiB random writes at QD 16 through NBD: p99 idle, then while a
    write-blocking mirror runs; whether it converged under the load."""
    p, q = start_sluice(tmp)
    target = os.path.join(tmp, "active.qcow2")
    # The client writes into top: a copy of it, the chain stays as made.
    top = os.path.join(tmp, "top.qcow2")
    shutil.copyfile(names[2], top)
    try:
        open_sluice(q, [names[0], names[1], top], True)
        sock = os.path.join(tmp, "nbd.sock")
        q.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        q.cmd("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "drive0"})
        uri = f"nbd+unix:///drive0?socket={sock}"
        idle = []
        fio_writes(uri, 5, idle)
        busy = []
        t = threading.Thread(target=fio_writes, args=(uri, 20, busy))
        t.start()
        time.sleep(1)
        t0 = time.perf_counter()
        q.cmd("drive-mirror", **{"job-id": "a0", "device": "drive0", "target": target, "sync": "full",
                                 "format": "qcow2", "copy-mode": "write-blocking"})
        q.wait("BLOCK_JOB_READY", timeout=120)
        ready = time.perf_counter() - t0
        converged_under_load = t.is_alive()
        t.join()
        q.cmd("block-job-complete", device="a0")
        q.wait("BLOCK_JOB_COMPLETED")
        q.cmd("block-export-del", id="e0")
        q.cmd("quit")
        q.close()
    finally:
        p.wait(30)
    # The pivot moved drive0 onto the target: it holds everything written.
    return idle[0], busy[0], ready, converged_under_load


out = open(E["OUT"], "a")
gib = int(E["SIZE"])
d = E["DISK_DIR"]
names = make_chain(d, gib)
copied = copied_bytes(names[2])
print(f"{gib} GiB chain, {copied / MiB:.0f} MiB allocated; drive-mirror sync=full onto a new qcow2")
print(f"{'storage':>9} {'round':>5} {'first':>6} {'qsd ready':>9} {'durable':>8} {'sluice ready':>12} "
      f"{'durable':>8} {'ratio':>6}  {'fio s':>6} {'vs disk':>7}")
for storage in E["STORAGE"].split():
    direct = storage == "direct"
    tf = fio_disk(d, names[0], copied, direct)
    for r in range(int(E["ROUNDS"])):
        order = ["qsd", "sluice"] if r % 2 == 0 else ["sluice", "qsd"]
        t = {}
        for who in order:
            with tempfile.TemporaryDirectory(prefix="sl-mbench-", dir=d) as tmp:
                target = os.path.join(tmp, "copy.qcow2")
                drop_caches()
                run = run_qsd if who == "qsd" else run_sluice
                t[who] = run(names, direct, target, tmp)
                c = subprocess.run(["qemu-img", "compare", "-U", names[2], target], capture_output=True, text=True)
                if c.returncode != 0:
                    raise SystemExit(f"{who}: target differs: {c.stdout}{c.stderr}")
        (qr, _, qd), (sr, _, sd) = t["qsd"], t["sluice"]
        rec = {"chain_gib": gib, "storage": storage, "round": r, "first": order[0], "copied": copied,
               "qsd_ready_s": qr, "qsd_durable_s": qd, "sluice_ready_s": sr, "sluice_durable_s": sd,
               "ratio": sd / qd, "fio_s": tf, "vs_disk": sd / tf}
        print(f"{storage:>9} {r:>5} {order[0]:>6} {qr:>9.2f} {qd:>8.2f} {sr:>12.2f} {sd:>8.2f} {sd / qd:>6.2f}  "
              f"{tf:>6.2f} {sd / tf:>6.2f}x", flush=True)
        out.write(json.dumps(rec) + "\n")
print("goal: ratio <= 0.5 (2x faster than QSD), vs disk <= 1.2x")
if E["ACTIVE"] == "1":
    with tempfile.TemporaryDirectory(prefix="sl-mbench-", dir=d) as tmp:
        (ip99, iiops), (bp99, biops), ready, conv = active(names, tmp)
    print(f"active mirror under fio randwrite 4k QD16: p99 idle {ip99:.0f} us ({iiops:.0f} IOPS), during the "
          f"mirror {bp99:.0f} us ({biops:.0f} IOPS): {bp99 / ip99:.2f}x (goal <= 2x); READY after {ready:.1f}s, "
          f"{'under the load' if conv else 'NOT under the load'}")
    out.write(json.dumps({"active_p99_idle_us": ip99, "active_p99_mirror_us": bp99, "ratio": bp99 / ip99,
                          "ready_s": ready, "converged_under_load": conv}) + "\n")
PYEOF

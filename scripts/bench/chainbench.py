"""Shared pieces of the benchmarks' Python halves (commit.sh, mirror.sh,
stream.sh, ...): the three-layer chain, a QMP client, cache dropping, the
disk's floor measured with fio, the order of sides, result checks, and p99s from
fio's per-I/O latency logs.
Imported with scripts/bench on `sys.path`; the shell halves share
scripts/bench/lib.sh. Both serve the honesty rules of issue 19: the peer in
the same run, alternating order, caches dropped, QEMU's defaults beside its
best, data checked before a time counts, ratios printed.

The chain: base/mid/top.qcow2 (64 KiB clusters), base 60%, mid 20%, top 10% of
the virtual size written in 1 MiB extents of random data; pristine copies
(`*.orig`) restored before every run so each run starts from the same bytes.
"""
import json
import os
import random
import shutil
import subprocess
import time

MiB = 1 << 20
LAYERS = ("base", "mid", "top")


def sh(*a, **kw):
    return subprocess.run([str(x) for x in a], check=True, capture_output=True, text=True, **kw).stdout


def make_chain(d, gib, pristine=LAYERS):
    """base/mid/top.qcow2 in d (kept between runs) with pristine copies
    (`*.orig`) of the layers in `pristine` (a stream only changes top)."""
    os.makedirs(d, exist_ok=True)
    stamp = os.path.join(d, f"chainbench-{gib}G.done")
    names = [os.path.join(d, f"cb-{n}-{gib}G.qcow2") for n in LAYERS]
    if os.path.exists(stamp):
        return names
    rnd = random.Random(gib)
    srcs = []
    for i in range(8):
        p = os.path.join(d, f"cb-rand{i}.bin")
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
    for n, p in zip(LAYERS, names):
        if n in pristine:
            shutil.copyfile(p, p + ".orig")
    open(stamp, "w").close()
    return names


def expected(names):
    """The original chain's content, flat (made from the pristine copies the
    first time it is asked for)."""
    flat = names[0].replace("-base-", "-flat-").replace(".qcow2", ".raw")
    if not os.path.exists(flat):
        restore(names)
        sh("qemu-img", "convert", "-O", "raw", names[2], flat + ".tmp")
        os.rename(flat + ".tmp", flat)
    return flat


def restore(names):
    """Pristine chain, then caches dropped (as root; a no-op elsewhere)."""
    for p in names:
        if os.path.exists(p + ".orig"):
            shutil.copyfile(p + ".orig", p)
    drop_caches()


def threads_cpu(pid, skip_prefix=None):
    """utime+stime in seconds of pid's threads, less those whose name starts
    with skip_prefix (a thread that ends while sampled is skipped)."""
    hz = os.sysconf("SC_CLK_TCK")
    t = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        if skip_prefix and name.startswith(skip_prefix):
            continue
        f = st[st.rindex(")") + 2:].split()
        t += int(f[11]) + int(f[12])
    return t / hz


def rotate(sides, r):
    """The sides rotated by round r: each goes first in turn."""
    k = r % len(sides)
    return list(sides[k:]) + list(sides[:k])


def fio_verify_nbd(uri, size="32M"):
    """Writes 4 KiB blocks at random offsets over size through fio's nbd
    engine, each with a checksum, reads them back; raises on a mismatch."""
    r = subprocess.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                        "--iodepth=16", f"--size={size}", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                        "--output-format=json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio verify through {uri} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")


def clat_log(prefix):
    """(completion time in epoch seconds, latency in ns) of every I/O of a fio
    job run with --write_lat_log=prefix --log_unix_epoch=1."""
    with open(prefix + "_clat.1.log") as f:
        return [(int(ms) / 1000.0, int(ns)) for ms, ns in (line.split(",")[:2] for line in f)]


def p99_us(ns):
    """The 99th percentile (nearest rank) of latencies in ns, in us."""
    ns = sorted(ns)
    return ns[max(0, -(-99 * len(ns) // 100) - 1)] / 1000.0


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def allocated_above(names, depth_from):
    """Bytes of data the chain holds in layers at depth < depth_from as seen
    from top (0 = top): what a commit of those layers copies."""
    n = 0
    for e in json.loads(sh("qemu-img", "map", "--output=json", names[2])):
        if e["data"] and e["depth"] < depth_from:
            n += e["length"]
    return n


def same_content(image, fmt="qcow2", names=None):
    """Raises unless image (with its chain) reads as the original chain."""
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", image, expected(names)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{image} differs from the original chain: {r.stdout}{r.stderr}")
    c = subprocess.run(["qemu-img", "check", "-f", fmt, image], capture_output=True, text=True)
    if c.returncode not in (0, 3):  # 3: leaked clusters only
        raise RuntimeError(f"qemu-img check {image}: {c.stdout}{c.stderr}")


class Qmp:
    def __init__(self, path):
        from qemu.qmp.legacy import QEMUMonitorProtocol  # the venv's; the rest needs none

        for _ in range(400):
            if os.path.exists(path):
                break
            time.sleep(0.025)
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

    def wait(self, name, timeout=600):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                ev = self.q.pull_event(wait=1.0)
            except Exception:
                ev = None
            if ev and ev["event"] == name:
                return ev
        raise RuntimeError(f"no {name} in {timeout}s")


def start_qsd(names, direct, tmp, extra=(), aio="io_uring"):
    """QSD with the chain as nodes base, mid, top (files base-file, ...).
    aio: "threads" is QEMU's default, "io_uring" its best here."""
    sock = os.path.join(tmp, "qsd.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    args = ["qemu-storage-daemon"]
    for n, p in zip(LAYERS, names):
        f = {"driver": "file", "node-name": f"{n}-file", "filename": p, "aio": aio,
             "cache": {"direct": direct, "no-flush": False}}
        args += ["--blockdev", json.dumps(f)]
        back = {"base": None, "mid": "base", "top": "mid"}[n]
        args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": n, "file": f"{n}-file",
                                           "backing": back, "cache": {"direct": direct}})]
    args += list(extra)
    args += ["--chardev", f"socket,id=qmp0,path={sock},server=on,wait=off", "--monitor", "chardev=qmp0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, Qmp(sock)


def start_sluice(sluice, names, direct, tmp, cores="0x1"):
    """sluice with the chain as nodes base, mid, top and device drive0 on top."""
    p = subprocess.Popen([sluice, "serve", "--runtime-dir", tmp, "-m", cores],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = Qmp(os.path.join(tmp, "sluice-qmp.sock"))
    q.cmd("bdev_qcow2_open", node_name="base", filename=names[0], no_backing=True, direct=direct)
    q.cmd("bdev_qcow2_open", node_name="mid", filename=names[1], backing="base", direct=direct)
    q.cmd("bdev_qcow2_open", name="drive0", node_name="top", filename=names[2], backing="mid", direct=direct)
    return p, q


def stop(p, q, what):
    """quit, then wait for the process to exit (closing its images flushes
    them); raises on a panic or a failed exit."""
    q.cmd("quit")
    q.close()
    p.wait(300)
    err = p.stderr.read().decode(errors="replace")
    if "panicked" in err or p.returncode != 0:
        raise RuntimeError(f"{what} exited {p.returncode}: {err[-2000:]}")


def fio_disk(d, src, nbytes, direct=True):
    """Seconds the disk needs to read and write nbytes at once (1 MiB, QD 16),
    the write made durable (fdatasync at the end)."""
    scratch = os.path.join(d, "fio-scratch")
    out = sh("fio", "--output-format=json", f"--direct={int(direct)}", "--ioengine=io_uring", "--bs=1M",
             "--iodepth=16", "--end_fsync=1",
             "--name=r", "--rw=read", f"--filename={src}",
             f"--size={os.path.getsize(src)}", f"--io_size={nbytes}",
             "--name=w", "--rw=write", f"--filename={scratch}", f"--size={nbytes}")
    os.unlink(scratch)
    jobs = json.loads(out)["jobs"]
    return max(j["job_runtime"] for j in jobs) / 1000.0

#!/usr/bin/env python3
"""RBD benchmark (issue #16's Performance section), on a throwaway one-OSD
memstore cluster (scripts/ceph/cluster.sh): 4 KiB random read and write at
QD 32 and 1 MiB sequential read and write on a 256 MiB image, by

  - `sluice perf` (its own process, the image through bdev_rbd_create),
    once per completion path (SLUICE_RBD_COMPLETION=message / eventfd),
  - sluice serve's NBD export of the image, driven by fio's nbd engine,
  - qemu-storage-daemon's rbd driver exporting the image over NBD, driven by
    fio the same way: with its defaults (cache=writeback means rbd_cache on)
    and with cache.direct=on (rbd_cache off: QEMU's other setting; the ratio
    is taken against the faster of the two),
  - `rbd bench` (librbd's own tool, the floor of what a client can do),

in alternating order round by round, with the client side's CPU time
(user + system of the process that talks to librbd: sluice, QSD, rbd
bench; never fio's) per I/O. Then a stream of a local qcow2 overlay whose
backing is the RBD image (128 MiB of data in 256 MiB), sluice against QSD
(the overlay's file node with its default aio=threads, and with io_uring),
alternating, the result compared with the image before a time counts.
With STREAM_MIB=512 (say) a second stream row copies that much data (in
an image twice as large) the same way, where fixed costs weigh less;
STREAM_ONLY=1 runs the streams alone; SLUICE_BIN2 (another build) streams
beside SLUICE_BIN as "sluice2", in the same alternation (before/after).
Page caches are dropped before each run. Data: `sluice perf -w verify` on
the image first, and every NBD server (sluice's, QSD's) passes a fio verify
run (checksummed 4 KiB writes read back) before its times count; `rbd bench`
is librbd's own tool and has no verify mode (it is the floor, not a peer
under test). Prints each figure and the ratios.

  scripts/bench/rbd.sh              (RUNTIME=5 ROUNDS=2 by default)

sluice's reactor polls: its process's CPU time is the whole run's wall
time per reactor whatever the load; the figures say so beside the others.
For sluice's NBD export the work is also counted as the vhost benchmark
does: the reactor's busy time (`framework_get_reactors`) plus the CPU time
of every other thread of the process (librbd's and librados' threads, the
NBD and RPC threads), per I/O: row "sluice NBD + fio (work)".
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("SLUICE_BIN", os.path.join(ROOT, "target/release/sluice"))
BIN2 = os.environ.get("SLUICE_BIN2")
RUNTIME = int(os.environ.get("RUNTIME", "5"))
STREAM_MIB = int(os.environ.get("STREAM_MIB", "0"))
STREAM_ONLY = os.environ.get("STREAM_ONLY") == "1"
ROUNDS = int(os.environ.get("ROUNDS", "2"))
CLUSTER = os.path.join(ROOT, "scripts/ceph/cluster.sh")
sys.path.insert(0, os.path.join(ROOT, "scripts/bench"))
from chainbench import fio_verify_nbd, threads_cpu  # noqa: E402

MiB = 1 << 20
HZ = os.sysconf("SC_CLK_TCK")

WORKLOADS = [("randread", "4k", 32), ("randwrite", "4k", 32), ("read", "1m", 4), ("write", "1m", 4)]


def run(*cmd, env=None, timeout=600):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {r.stdout}{r.stderr}")
    return r.stdout


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / HZ


def reactors_busy(sock):
    out = run(BIN, "rpc", "-s", sock, "framework_get_reactors")
    r = json.loads(out[out.index("{"):])
    return sum(x["busy"] for x in r["reactors"]) / r["tick_rate"]


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_path(p, proc):
    for _ in range(400):
        if os.path.exists(p):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited")
        time.sleep(0.05)
    raise RuntimeError(f"no {p}")


class Bench:
    def __init__(self, work):
        self.work = work
        self.cdir = os.path.join(work, "ceph")
        out = run(CLUSTER, "start", self.cdir, "1536")
        kv = dict(l.split("=", 1) for l in out.split() if "=" in l)
        self.conf = kv["CONF"]
        # Without exclusive-lock: one writer after another must not wait
        # for a killed predecessor's lock to time out.
        run("rbd", "-c", self.conf, "create", "rbd/bench", "--size", "256M",
            "--image-feature", "layering")
        run("rbd", "-c", self.conf, "bench", "--io-type", "write", "--io-pattern", "seq",
            "--io-size", "4M", "--io-total", "256M", "rbd/bench")
        self.config = os.path.join(work, "perf.json")
        with open(self.config, "w") as f:
            json.dump({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_rbd_register_cluster", "params": {"name": "c", "config_file": self.conf}},
                {"method": "bdev_rbd_create", "params": {"name": "r", "pool_name": "rbd", "rbd_name": "bench",
                                                         "block_size": 512, "cluster_name": "c"}}]}]}, f)

    def stop(self):
        run(CLUSTER, "stop", self.cdir)

    # Each returns (IOPS, client CPU seconds, I/Os).
    def sluice_perf(self, rw, bs, qd, path):
        env = dict(os.environ, SLUICE_RBD_COMPLETION=path, RUST_LOG="warn")
        before = children_cpu()
        out = run(BIN, "perf", "-c", self.config, "-T", "r", "-q", qd, "-o", bs, "-w", rw,
                  "-t", RUNTIME, "--json", env=env)
        cpu = children_cpu() - before
        j = json.loads(out[out.index("{"):])
        res = j["results"][0]
        if res["io_failed"]:
            raise RuntimeError(f"sluice perf: {res['io_failed']} I/Os failed")
        return res["iops"], cpu, res["iops"] * res["runtime"]

    def fio_nbd(self, uri, rw, bs, qd):
        out = run("fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
                  f"--iodepth={qd}", "--numjobs=1", "--time_based", f"--runtime={RUNTIME}",
                  "--size=256M", "--output-format=json")
        j = json.loads(out[out.index("{"):])["jobs"][0]
        iops = j["read"]["iops"] + j["write"]["iops"]
        ios = j["read"]["total_ios"] + j["write"]["total_ios"]
        return iops, ios

    def verify_perf(self):
        out = run(BIN, "perf", "-c", self.config, "-T", "r", "-q", "16", "-w", "verify", "-t", "1", "--json",
                  "--length", "32m", env=dict(os.environ, RUST_LOG="warn"))
        j = json.loads(out[out.index("{"):])
        if not j["ok"] or j["errors"] or j["total"]["io_failed"]:
            raise RuntimeError(f"sluice perf verify on RBD failed: {j}")

    def served(self, kind, rw, bs, qd):
        d = tempfile.mkdtemp(dir=self.work)
        sock = os.path.join(d, "nbd.sock")
        if kind == "sluice":
            p = subprocess.Popen([BIN, "serve", "--runtime-dir", d, "--cores", "0", "--json", self.config,
                                  "--nbd-listen", f"unix:{sock}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
            wait_path(os.path.join(d, "sluice.sock"), p)
            run(BIN, "rpc", "-s", os.path.join(d, "sluice.sock"), "block-export-add", "type=nbd", "id=e",
                "node-name=r", "name=r", "writable=true")
        else:
            direct = ",cache.direct=on" if kind == "qsd-direct" else ""
            p = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                                  f"driver=rbd,node-name=r,pool=rbd,image=bench,conf={self.conf}{direct}",
                                  "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                  "--export", "type=nbd,id=e,node-name=r,name=r,writable=on"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_path(sock, p)
        rpc = os.path.join(d, "sluice.sock")
        try:
            fio_verify_nbd(f"nbd+unix:///r?socket={sock}", "8M")
            c0 = proc_cpu(p.pid)
            if kind == "sluice":
                w0 = reactors_busy(rpc) + threads_cpu(p.pid, "reactor_")
            iops, ios = self.fio_nbd(f"nbd+unix:///r?socket={sock}", rw, bs, qd)
            cpu = proc_cpu(p.pid) - c0
            if kind == "sluice":
                self.last_work = reactors_busy(rpc) + threads_cpu(p.pid, "reactor_") - w0
        finally:
            p.terminate()
            p.wait(20)
        return iops, cpu, ios

    def rbd_bench(self, rw, bs, qd):
        total = {"4k": "64M", "1m": "512M"}[bs]
        io_type = "read" if "read" in rw else "write"
        pattern = "rand" if rw.startswith("rand") else "seq"
        before = children_cpu()
        t0 = time.time()
        out = run("rbd", "-c", self.conf, "bench", "--io-type", io_type, "--io-pattern", pattern,
                  "--io-size", bs.upper(), "--io-threads", qd, "--io-total", total, "rbd/bench")
        wall = time.time() - t0
        cpu = children_cpu() - before
        last = [l for l in out.splitlines() if l.startswith("elapsed")][-1]
        f = last.split()
        ops = int(f[3])
        return float(f[5]), cpu, ops

    def stream(self, kind, golden_name, size_mib=256):
        ov = os.path.join(self.work, f"ov-{kind}.qcow2")
        if os.path.exists(ov):
            os.unlink(ov)
        backing = f"rbd:rbd/{golden_name}:conf={self.conf}"
        run("qemu-img", "create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", ov, f"{size_mib}M")
        d = tempfile.mkdtemp(dir=self.work)
        qmp = os.path.join(d, "qmp.sock")
        if kind in ("sluice", "sluice2"):
            p = subprocess.Popen([BIN if kind == "sluice" else BIN2, "serve", "--runtime-dir", d, "--cores", "0", "--qmp-socket", qmp],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            p = subprocess.Popen(["qemu-storage-daemon", "--chardev",
                                  f"socket,path={qmp},server=on,wait=off,id=m", "--monitor", "chardev=m"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_path(qmp, p)
            sys.path.insert(0, os.path.join(ROOT, "tests/py"))
            from stream_common import Vm
            for _ in range(50):
                try:
                    vm = Vm(qmp)
                    break
                except Exception:
                    time.sleep(0.05)
            drop_caches()
            c0 = proc_cpu(p.pid)
            f = {"driver": "file", "filename": ov}
            if kind == "qsd-uring":
                f["aio"] = "io_uring"
            vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": f})
            t0 = time.time()
            vm.rcmd("block-stream", {"device": "ov", "job-id": "s"})
            ev = vm.event_wait("BLOCK_JOB_COMPLETED", 600, {"device": "s"})
            t = time.time() - t0
            cpu = proc_cpu(p.pid) - c0
            if "error" in ev["data"]:
                raise RuntimeError(f"{kind} stream: {ev}")
            vm.rcmd("blockdev-del", {"node-name": "ov"})
            vm.q.close()
        finally:
            p.terminate()
            p.wait(20)
        ref = os.path.join(self.work, f"{golden_name}.raw")
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, ref)
        return t, cpu


def main():
    if not os.path.exists(BIN):
        run("cargo", "build", "--release", "-p", "sluice")
    work = tempfile.mkdtemp(prefix="rbdbench.")
    b = Bench(work)
    try:
        print(f"load before: {open('/proc/loadavg').read().split()[:3]}")
        b.verify_perf()
        res = {}
        for wl in [] if STREAM_ONLY else WORKLOADS:
            rw, bs, qd = wl
            runners = [("sluice perf (message)", lambda: b.sluice_perf(rw, bs, qd, "message")),
                       ("sluice perf (eventfd)", lambda: b.sluice_perf(rw, bs, qd, "eventfd")),
                       ("sluice NBD + fio", lambda: b.served("sluice", rw, bs, qd)),
                       ("QSD rbd NBD + fio", lambda: b.served("qsd", rw, bs, qd)),
                       ("QSD rbd direct NBD + fio", lambda: b.served("qsd-direct", rw, bs, qd)),
                       ("rbd bench", lambda: b.rbd_bench(rw, bs, qd))]
            for r in range(ROUNDS):
                order = runners if r % 2 == 0 else list(reversed(runners))
                for name, f in order:
                    drop_caches()
                    iops, cpu, ios = f()
                    res.setdefault((wl, name), []).append((iops, cpu / max(ios, 1) * 1e6))
                    if name == "sluice NBD + fio":
                        res.setdefault((wl, name + " (work)"), []).append(
                            (iops, b.last_work / max(ios, 1) * 1e6))
            print(f"\n{rw} {bs} QD{qd}:")
            for name in [n for n, _ in runners] + ["sluice NBD + fio (work)"]:
                v = res[(wl, name)]
                iops = sum(x[0] for x in v) / len(v)
                us = sum(x[1] for x in v) / len(v)
                print(f"  {name:24s} {iops:10.0f} IOPS  {us:8.1f} us client CPU/IO   runs {[int(x[0]) for x in v]}")
            s = res[(wl, "sluice NBD + fio")]
            w = res[(wl, "sluice NBD + fio (work)")]
            for qn in ("QSD rbd NBD + fio", "QSD rbd direct NBD + fio"):
                q = res[(wl, qn)]
                print(f"  sluice/{qn[:-10]}: {sum(x[0] for x in s) / sum(x[0] for x in q):.2f}x IOPS, "
                      f"{sum(x[1] for x in w) / sum(x[1] for x in q):.2f}x client CPU/IO "
                      f"(sluice's work: reactor busy + other threads; goal: >= 1x IOPS at <= 0.5x CPU)")
            m = res[(wl, "sluice perf (message)")]
            e = res[(wl, "sluice perf (eventfd)")]
            print(f"  eventfd/message: {sum(x[0] for x in e) / sum(x[0] for x in m):.2f}x IOPS")
        # Stream: 128 MiB of data in a 256 MiB image (and STREAM_MIB in twice that).
        rows = [("golden", 128)] + ([(f"golden{STREAM_MIB}", STREAM_MIB)] if STREAM_MIB else [])
        for name, data_mib in rows:
            golden = os.path.join(work, f"{name}.raw")
            run("qemu-img", "create", "-f", "raw", golden, f"{2 * data_mib}M")
            cmds = []
            for i in range(data_mib // 4):
                cmds += ["-c", f"write -P {0x10 + i % 0xe0} {i * 8}M 4M"]
            run("qemu-io", "-f", "raw", *cmds, golden)
            run("rbd", "-c", b.conf, "import", golden, f"rbd/{name}")
            st = {"sluice": []} | ({"sluice2": []} if BIN2 else {}) | {"qsd": [], "qsd-uring": []}
            for r in range(ROUNDS):
                for kind in (list(st) if r % 2 == 0 else list(st)[::-1]):
                    st[kind].append(b.stream(kind, name, 2 * data_mib))
            print(f"\nstream of a {2 * data_mib} MiB overlay on RBD ({data_mib} MiB of data):")
            for k, v in st.items():
                print(f"  {k:9s} {[round(x[0], 2) for x in v]} s  CPU {[round(x[1], 2) for x in v]} s")
            for k in [k for k in st if k != "sluice"]:
                print(f"  {k} time / sluice time: {sum(x[0] for x in st[k]) / sum(x[0] for x in st['sluice']):.2f}x")
            if BIN2:
                print(f"  qsd time / sluice2 time: {sum(x[0] for x in st['qsd']) / sum(x[0] for x in st['sluice2']):.2f}x")
        print(f"load after: {open('/proc/loadavg').read().split()[:3]}")
    finally:
        b.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""RPC benchmarks against a running sluice (see rpc.sh).

- latency: N sequential small calls (spdk_get_version) on one connection,
  round trip per call (median, p99), with a raw-socket client and with SPDK's
  JSONRPCClient;
- throughput: RPCs per second from C concurrent clients (one process each);
- bulk: B bdev_null_create calls from a script (spdk-rpc reading stdin, and
  JSONRPCClient in a loop), then bdev_get_bdevs of all of them;
- QMP (with --qmp and --qsd-qmp): N sequential query-version round trips on
  sluice's QMP socket and on qemu-storage-daemon's, alternating who goes
  first over two rounds, with the ratio.
"""

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--rpc", required=True)
ap.add_argument("--calls", type=int, default=1000)
ap.add_argument("--clients", type=int, default=8)
ap.add_argument("--seconds", type=float, default=3.0)
ap.add_argument("--bdevs", type=int, default=1000)
ap.add_argument("--qmp", help="sluice's QMP socket")
ap.add_argument("--qsd-qmp", help="qemu-storage-daemon's QMP socket")
args = ap.parse_args()


class Raw:
    """A minimal client: one request out, read up to the reply's newline."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.id = 0

    def call(self, method, params=None):
        self.id += 1
        req = {"jsonrpc": "2.0", "method": method, "id": self.id}
        if params is not None:
            req["params"] = params
        self.s.sendall(json.dumps(req).encode())
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError(r["error"])
        return r["result"]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def latency_raw():
    c = Raw(args.rpc)
    for _ in range(50):
        c.call("spdk_get_version")
    lat = []
    for _ in range(args.calls):
        t0 = time.perf_counter_ns()
        c.call("spdk_get_version")
        lat.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(lat), pct(lat, 0.99)


def latency_spdk():
    from spdk.rpc.client import JSONRPCClient
    c = JSONRPCClient(args.rpc)
    for _ in range(50):
        c.call("spdk_get_version")
    lat = []
    for _ in range(args.calls):
        t0 = time.perf_counter_ns()
        c.call("spdk_get_version")
        lat.append((time.perf_counter_ns() - t0) / 1000)
    c.close()
    return statistics.median(lat), pct(lat, 0.99)


def worker(deadline, q):
    c = Raw(args.rpc)
    n = 0
    while time.time() < deadline:
        c.call("spdk_get_version")
        n += 1
    q.put(n)


def throughput():
    q = mp.Queue()
    start = time.time() + 0.5
    deadline = start + args.seconds
    ps = [mp.Process(target=worker, args=(deadline, q)) for _ in range(args.clients)]
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    # Workers start within the 0.5 s lead; count over the whole window.
    return total / (deadline - (start - 0.5))


def bulk():
    spdk_rpc = os.path.join(os.path.dirname(sys.executable), "spdk-rpc")
    script = "".join(f"bdev_null_create BenchA{i} 1 512\n" for i in range(args.bdevs))
    t0 = time.perf_counter()
    p = subprocess.run([spdk_rpc, "-s", args.rpc], input=script, capture_output=True, text=True)
    t_script = time.perf_counter() - t0
    if not (p.returncode == 0):
        raise AssertionError(p.stdout + p.stderr)
    # The same script with --dry-run: spdk-rpc's own cost (start-up, argparse per line), no server.
    t0 = time.perf_counter()
    p = subprocess.run([spdk_rpc, "-s", args.rpc, "--dry-run"], input=script, capture_output=True, text=True)
    t_client = time.perf_counter() - t0
    if not (p.returncode == 0):
        raise AssertionError(p.stdout + p.stderr)

    from spdk.rpc.client import JSONRPCClient
    c = JSONRPCClient(args.rpc)
    t0 = time.perf_counter()
    for i in range(args.bdevs):
        c.bdev_null_create(name=f"BenchB{i}", num_blocks=2048, block_size=512)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = len(Raw(args.rpc).call("bdev_get_bdevs"))
    t_list = time.perf_counter() - t0
    if not (n == 2 * args.bdevs):
        raise AssertionError(n)
    # SPDK's client re-decodes its whole buffer after every 4 KiB it receives:
    # quadratic in the reply size, whatever the server.
    t0 = time.perf_counter()
    n = len(c.bdev_get_bdevs())
    t_list_spdk = time.perf_counter() - t0
    if not (n == 2 * args.bdevs):
        raise AssertionError(n)
    t0 = time.perf_counter()
    cfg = c.call("save_config")
    t_save = time.perf_counter() - t0
    if not (len(cfg["subsystems"][0]["config"]) >= 2 * args.bdevs):
        raise AssertionError('failed: len(cfg["subsystems"][0]["config"]) >= 2 * args.bdevs')
    for i in range(args.bdevs):
        c.bdev_null_delete(name=f"BenchA{i}")
        c.bdev_null_delete(name=f"BenchB{i}")
    c.close()
    return t_script, t_client, t_loop, t_list, t_list_spdk, t_save


def latency_qmp(path):
    """N sequential query-version round trips on a QMP socket (after the
    greeting and qmp_capabilities); (median, p99) in us."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rb")

    def call(cmd):
        s.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
        while True:
            line = f.readline()
            if not line:
                raise RuntimeError(f"{path}: connection closed")
            r = json.loads(line)
            if "event" in r:
                continue
            if "return" not in r:
                raise RuntimeError(f"{path}: {cmd}: {r}")
            return r["return"]

    if "QMP" not in json.loads(f.readline()):
        raise RuntimeError(f"{path}: no QMP greeting")
    call("qmp_capabilities")
    for _ in range(50):
        call("query-version")
    lat = []
    for _ in range(args.calls):
        t0 = time.perf_counter_ns()
        call("query-version")
        lat.append((time.perf_counter_ns() - t0) / 1000)
    s.close()
    return statistics.median(lat), pct(lat, 0.99)


med, p99 = latency_raw()
print(f"latency raw client:      {args.calls} sequential spdk_get_version: median {med:.1f} us, p99 {p99:.1f} us")
med2, p992 = latency_spdk()
print(f"latency JSONRPCClient:   {args.calls} sequential spdk_get_version: median {med2:.1f} us, p99 {p992:.1f} us")
rps = throughput()
print(f"throughput:              {args.clients} clients: {rps:.0f} RPC/s")
t_script, t_client, t_loop, t_list, t_list_spdk, t_save = bulk()
print(f"bulk spdk-rpc script:    {args.bdevs} bdev_null_create: {t_script:.3f} s (the same script with --dry-run, no server: {t_client:.3f} s)")
print(f"bulk JSONRPCClient loop: {args.bdevs} bdev_null_create: {t_loop:.3f} s")
print(f"bdev_get_bdevs of {2 * args.bdevs}: raw client {t_list * 1000:.1f} ms, JSONRPCClient {t_list_spdk * 1000:.1f} ms; save_config: {t_save * 1000:.1f} ms")
if args.qmp and args.qsd_qmp:
    res = {"sluice": [], "qsd": []}
    for r in range(2):
        for who in (("sluice", "qsd") if r % 2 == 0 else ("qsd", "sluice")):
            res[who].append(latency_qmp(args.qmp if who == "sluice" else args.qsd_qmp))
    sm = statistics.median(m for m, _ in res["sluice"])
    qm = statistics.median(m for m, _ in res["qsd"])
    print(f"QMP query-version x {args.calls}, 2 rounds alternating: sluice median {sm:.1f} us "
          f"(p99 {max(p for _, p in res['sluice']):.1f}), qemu-storage-daemon median {qm:.1f} us "
          f"(p99 {max(p for _, p in res['qsd']):.1f}); sluice/qsd {sm / qm:.2f}")

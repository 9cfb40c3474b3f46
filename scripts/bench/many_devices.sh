#!/usr/bin/env bash
# Many devices (issue 19): N null, malloc and qcow2-over-file devices made in
# one sluice (N = 1000, 2000, 5000, 10000 by default), timed per step:
# creation (SPDK's client, one connection), bdev_get_bdevs,
# query-named-block-nodes and query-block-jobs (QMP); growth checked for
# linearity (each step's time per device at the largest N against the
# smallest: a ratio near 1 is linear, near N_max/N_min quadratic), and the
# memory per device (RSS growth divided by the count) and the descriptors per
# device (the daemon's open fds, growth divided by the count; a failed
# creation says at which device). bdev_get_bdevs is read
# over a plain socket (SPDK's client is quadratic in a large reply), and the
# daemon's CPU time of the creation and of each listing is shown beside its wall time (on a loaded
# machine the wall time is mostly waiting for a core). No peer runs: QSD
# has no SPDK methods and its QMP answers are another program's cost; this
# measures sluice's own scaling (so no order to alternate and no QEMU
# settings). Caches are dropped before each count's run; the listings are
# checked to hold every device made before their times count.
#   scripts/bench/many_devices.sh
#   COUNTS="1000 2000" KINDS="null qcow2" scripts/bench/many_devices.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNTS=${COUNTS:-"1000 2000 5000 10000"}
KINDS=${KINDS:-"null malloc qcow2"}
DISK_DIR=${DISK_DIR:-/var/tmp/sluice-bench-devices}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
export SLUICE COUNTS KINDS DISK_DIR
exec "$PY" - <<'PYEOF'
import json, os, shutil, subprocess, sys, tempfile, time
sys.path.insert(0, "scripts/bench")
from chainbench import Qmp, drop_caches, sh
from spdk.rpc.client import JSONRPCClient

E = os.environ
counts = [int(x) for x in E["COUNTS"].split()]
d = E["DISK_DIR"]
os.makedirs(d, exist_ok=True)
proto = os.path.join(d, "proto.qcow2")
if not os.path.exists(proto):
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", proto, "1M")


def cpu_s(pid):
    """CPU time all of the daemon's threads have run (schedstat, ns)."""
    t = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            t += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return t / 1e9


def raw_call(path, method, pid):
    """One JSON-RPC call over a plain socket, its reply read in chunks joined
    once (SPDK's client re-parses its whole buffer on every chunk: quadratic
    in the reply by itself). Returns the result and the daemon's CPU time for
    it, read while the connection (and so its thread) is still open."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    c0 = cpu_s(pid)
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode())
    chunks = []
    while not chunks or not chunks[-1].endswith(b"\n"):
        b = s.recv(1 << 20)
        if not b:
            raise RuntimeError(f"{method}: connection closed")
        chunks.append(b)
    c1 = cpu_s(pid)
    s.close()
    return json.loads(b"".join(chunks))["result"], c1 - c0


def nfds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid):
    return int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0])


def timed(f):
    t0 = time.perf_counter()
    r = f()
    return time.perf_counter() - t0, r


def run(kind, n):
    files = []
    if kind == "qcow2":
        for i in range(n):
            f = os.path.join(d, f"i{i}.qcow2")
            if not os.path.exists(f):
                shutil.copyfile(proto, f)
            files.append(f)
    drop_caches()
    with tempfile.TemporaryDirectory(prefix="sl-many-") as tmp:
        # The log goes to a file: a pipe nobody reads would fill with one
        # line per device and stop the daemon.
        log = open(os.path.join(tmp, "log"), "w+b")
        p = subprocess.Popen([E["SLUICE"], "serve", "--runtime-dir", tmp, "-m", "0x3"],
                             stdout=subprocess.DEVNULL, stderr=log)
        try:
            sock = os.path.join(tmp, "sluice.sock")
            while not os.path.exists(sock):
                time.sleep(0.02)
            time.sleep(0.1)
            c = JSONRPCClient(sock)
            q = Qmp(os.path.join(tmp, "sluice-qmp.sock"))
            rss0 = rss_kb(p.pid)
            fds0 = nfds(p.pid)

            def create():
                for i in range(n):
                    try:
                        create_one(i)
                    except Exception as e:
                        raise RuntimeError(f"{kind}: creating device {i} of {n} failed "
                                           f"({nfds(p.pid)} fds open): {e}") from e

            def create_one(i):
                if kind == "null":
                    c.call("bdev_null_create", {"name": f"d{i}", "num_blocks": 2048, "block_size": 512})
                elif kind == "malloc":
                    c.call("bdev_malloc_create", {"name": f"d{i}", "num_blocks": 256, "block_size": 512})
                else:
                    c.call("bdev_qcow2_open", {"name": f"d{i}", "filename": files[i]})
            c0 = cpu_s(p.pid)
            t_create, _ = timed(create)
            cpu_create = cpu_s(p.pid) - c0
            rss = rss_kb(p.pid)
            fds = nfds(p.pid)
            t_get, (bdevs, cpu_get) = timed(lambda: raw_call(sock, "bdev_get_bdevs", p.pid))
            c1 = cpu_s(p.pid)
            want = n * (2 if kind == "qcow2" else 1)  # a qcow2 device has its image node too
            if len(bdevs) < n:
                raise RuntimeError(f"bdev_get_bdevs listed {len(bdevs)} of {want}")
            if not {f"d{i}" for i in range(n)} <= {b["name"] for b in bdevs}:
                raise RuntimeError("bdev_get_bdevs lacks some of the devices made")
            t_nodes, nodes = timed(lambda: q.cmd("query-named-block-nodes"))
            c2 = cpu_s(p.pid)
            t_jobs, _ = timed(lambda: q.cmd("query-block-jobs"))
            q.cmd("quit")
            q.close()
            p.wait(120)
            log.seek(0)
            if b"panicked" in log.read():
                raise RuntimeError("sluice panicked")
            return {"create": t_create, "bdev_get_bdevs": t_get, "query-named-block-nodes": t_nodes,
                    "query-block-jobs": t_jobs, "rss_per_dev_kb": (rss - rss0) / n, "fds_per_dev": (fds - fds0) / n, "nodes": len(nodes),
                    "cpu_get": cpu_get, "cpu_nodes": c2 - c1, "cpu_create": cpu_create}
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


for kind in E["KINDS"].split():
    res = {}
    for n in counts:
        res[n] = run(kind, n)
        r = res[n]
        print(f"{kind:6} n={n:6}: create {r['create']:.2f}s ({r['create'] / n * 1e6:.0f} us/dev, "
              f"{r['cpu_create'] / n * 1e6:.0f} us CPU/dev), "
              f"bdev_get_bdevs {r['bdev_get_bdevs'] * 1e3:.0f} ms, query-named-block-nodes "
              f"{r['query-named-block-nodes'] * 1e3:.0f} ms ({r['nodes']} nodes), query-block-jobs "
              f"{r['query-block-jobs'] * 1e3:.1f} ms, RSS {r['rss_per_dev_kb']:.1f} KiB/device, {r['fds_per_dev']:.2f} fds/device; per device: "
              f"bdev_get_bdevs {r['bdev_get_bdevs'] / n * 1e6:.1f} us ({r['cpu_get'] / n * 1e6:.1f} us CPU), "
              f"query-named-block-nodes {r['query-named-block-nodes'] / n * 1e6:.1f} us "
              f"({r['cpu_nodes'] / n * 1e6:.1f} us CPU)", flush=True)
    lo, hi = counts[0], counts[-1]
    for k in ("create", "cpu_create", "bdev_get_bdevs", "query-named-block-nodes", "cpu_get", "cpu_nodes"):
        ratio = (res[hi][k] / hi) / (res[lo][k] / lo)
        verdict = "linear" if ratio < 2 else ("QUADRATIC-looking" if ratio > hi / lo / 2 else "superlinear")
        print(f"{kind:6} {k}: per-device time at {hi} / at {lo} = {ratio:.2f} ({verdict}; quadratic would be {hi / lo:.0f})")
PYEOF

#!/usr/bin/env bash
# Post-copy streaming over NBD between two network namespaces: the three-layer
# chain (chainbench.make_chain, 1 GiB by default) is exported read-only by
# qemu-storage-daemon in namespace A (the same neutral source for both), and
# the destination in namespace B (sluice, then qemu-storage-daemon, alternating
# which goes first) opens it over NBD (plain TCP, then TLS with the same
# certificates), puts a fresh overlay on it and streams it to completion.
# qemu-storage-daemon runs with its defaults (`qsd`: the overlay's file node
# with aio=threads) and with its best setting here (`qsd-best`: aio=io_uring).
# Page caches are dropped before each run; each result's data is compared with
# the chain (qemu-img compare) before its time counts. Prints times and ratios.
#
# Then, per destination and transport, the issue's latency goal: a client on
# the destination (fio, 4 KiB random reads at QD 1 through an NBD export of the
# overlay on a Unix socket) measures its read p99 idle (before the stream:
# every read crosses the network) and while the stream runs at full speed
# (fio runs for 70% of that destination's best stream time); goal: the p99
# during the migration within 2x of the idle p99. Data compared again after.
# Each latency line also gives the job's progress per second while the
# client read (its offset, which counts ranges with nothing to copy too): a
# stream that stops while a guest reads is not a migration. sluice's
# destination cuts a job's reads into 64 KiB pieces while a client reads
# (SLUICE_NBD_BG_PIECE_KB=0 in the environment turns that off, to compare)
# and paces them at 64 MiB/s (SLUICE_NBD_BG_BUSY_MIBS=N sets another rate,
# 0 none).
#
# LAT_SPEED=N (MiB/s) runs the latency phase's stream at that speed limit
# instead of full speed (a migration with a speed limit, as the issue's
# post-copy scenario runs it), the client then reading for LAT_SECS (5).
# KINDS="sluice" (default "sluice qsd qsd-best") runs only those destinations
# (ratios are printed when all three ran). With RUNS=0 and no
# LAT_SPEED the client reads for LAT_SECS at full speed (keep it shorter than
# the stream: the script fails if the stream ends first). LINK_MBIT=N shapes
# the veth pair to N Mbit/s each way (a token bucket, `tc tbf`), as a link
# between two real hosts is: there a job's data queued on the link is what a
# client's reply waits behind (the unshaped veth pair is as fast as memory).
# SLUICE_ARGS adds options to sluice's `serve` (e.g. "--park-after-us 0").
# LAT_LOG=PREFIX keeps fio's per-read latency log (with offsets: a read below
# the job's offset at its time was local) as PREFIX_clat.1.log (the phase
# during the stream overwrites the idle one's).
#
#   scripts/bench/nbd_tls.sh            # GIB=1 RUNS=2 TLS="off on" LAT=1 IDLE_SECS=4
#   RUNS=0 LAT_SPEED=100 scripts/bench/nbd_tls.sh   # only the latency phase, at 100 MiB/s
# Needs root (ip netns), the test venv, openssl.
set -euo pipefail
cd "$(dirname "$0")/../.."
GIB=${GIB:-1}
RUNS=${RUNS:-2}
TLS=${TLS:-"off on"}
DIR=${DIR:-/var/tmp/sluice-bench-nbd}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
LAT=${LAT:-1}
IDLE_SECS=${IDLE_SECS:-4}
LAT_SPEED=${LAT_SPEED:-0}
LAT_SECS=${LAT_SECS:-5}
KINDS=${KINDS:-"sluice qsd qsd-best"}
LINK_MBIT=${LINK_MBIT:-0}
export SLUICE GIB RUNS TLS DIR LAT IDLE_SECS LAT_SPEED LAT_SECS KINDS LINK_MBIT
exec "$PY" - <<'PYEOF'
import json, os, shutil, subprocess, sys, time
sys.path.insert(0, "scripts/bench")
sys.path.insert(0, "tests/py")
from chainbench import Qmp, make_chain, drop_caches
from tls_pki import make_pki

E = os.environ
MiB = 1 << 20
A_IP, B_IP, PORT = "10.199.0.1", "10.199.0.2", 10809  # (in tls_pki.SERVER_SAN)
NA, NB, VA, VB = "sbA", "sbB", "vbA", "vbB"


def sh(*a):
    subprocess.run(a, check=True, capture_output=True)


def nets_up():
    for ns in (NA, NB):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh("ip", "netns", "add", NA)
    sh("ip", "netns", "add", NB)
    sh("ip", "link", "add", VA, "type", "veth", "peer", "name", VB)
    sh("ip", "link", "set", VA, "netns", NA)
    sh("ip", "link", "set", VB, "netns", NB)
    for ns, v, ip in ((NA, VA, A_IP), (NB, VB, B_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", v)
        sh("ip", "-n", ns, "link", "set", v, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        if int(E.get("LINK_MBIT", "0")):
            # A link of that speed (both ways), as between two real hosts.
            # (A token bucket: netem is not in every kernel.)
            sh("tc", "-n", ns, "qdisc", "add", "dev", v, "root", "tbf",
               "rate", f"{int(E['LINK_MBIT'])}mbit", "burst", "64kb", "latency", "100ms")


def nets_down():
    for ns in (NA, NB):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def source(names, pki, tls):
    args = ["ip", "netns", "exec", NA, "qemu-storage-daemon",
            "--object", f"tls-creds-x509,id=ts,dir={pki},endpoint=server"]
    for i, p in enumerate(names):
        args += ["--blockdev", json.dumps({"driver": "file", "node-name": f"f{i}", "filename": p,
                                           "read-only": True}),
                 "--blockdev", json.dumps({"driver": "qcow2", "node-name": f"l{i}", "file": f"f{i}",
                                           "read-only": True,
                                           "backing": f"l{i - 1}" if i else None})]
    args += ["--nbd-server", f"addr.type=inet,addr.host={A_IP},addr.port={PORT}"
             + (",tls-creds=ts" if tls else ""),
             "--export", f"type=nbd,id=e0,node-name=l{len(names) - 1},name=top"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        if subprocess.run(["ip", "netns", "exec", NA, "ss", "-Htln", f"( sport = :{PORT} )"],
                          capture_output=True, text=True).stdout.strip():
            return p
        time.sleep(0.05)
    raise RuntimeError(f"source did not start: {p.stderr.read()}")


def connect(p, path):
    """A QMP session once the monitor answers (its socket appears a moment
    before it does); the process's stderr if it died."""
    for _ in range(400):
        if p.poll() is not None:
            raise RuntimeError(f"destination exited: {p.stderr.read()}")
        try:
            return Qmp(path)
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"no QMP on {path}")


def dest(kind, tmp):
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, exist_ok=True)
    if kind == "sluice":
        p = subprocess.Popen(["ip", "netns", "exec", NB, E["SLUICE"], "serve", "--runtime-dir", tmp,
                              "-m", "0x1", "--nbd-allow-remote"] + E.get("SLUICE_ARGS", "").split(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return p, connect(p, os.path.join(tmp, "sluice-qmp.sock"))
    sock = os.path.join(tmp, "qsd.sock")
    p = subprocess.Popen(["ip", "netns", "exec", NB, "qemu-storage-daemon", "--chardev",
                          f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "chardev=m0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, connect(p, sock)


def file_node(kind, ov):
    f = {"driver": "file", "filename": ov}
    if kind == "qsd-best":
        f["aio"] = "io_uring"
    return f


def migrate(kind, names, pki, tls, tmp, during_secs=None):
    """One post-copy run on destination `kind`: a fresh overlay on the
    source's export, streamed to completion, its data then compared with the
    chain. Without `during_secs`: returns the stream's time. With it: a client
    reads the overlay through an NBD export (idle first, then for
    `during_secs` while the stream runs) and the two (p50, p99, reads) come
    back instead."""
    gib = int(E["GIB"])
    ov = os.path.join(tmp, f"ov-{kind}.qcow2")
    if os.path.exists(ov):
        os.unlink(ov)
    sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"nbd://{A_IP}:{PORT}/top", "-F", "raw",
       ov, f"{gib}G")
    src = source(names, pki, tls)
    drop_caches()
    d = os.path.join(tmp, kind)
    p, q = dest(kind, d)
    sock = os.path.join(d, "lat.sock")
    try:
        nbd = {"driver": "nbd", "node-name": "remote", "read-only": True, "export": "top",
               "server": {"type": "inet", "host": A_IP, "port": str(PORT)}}
        if tls:
            q.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tc", "dir": pki})
            nbd["tls-creds"] = "tc"
        q.cmd("blockdev-add", **nbd)
        q.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "ov", "backing": "remote",
                                 "file": file_node(kind, ov)})
        if during_secs:
            q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            q.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "ov"}, name="ov")
            idle = fio_p99(sock, int(E["IDLE_SECS"]), gib)
        t0 = time.time()
        job = {"device": "ov", "job-id": "s0"}
        if during_secs and int(E["LAT_SPEED"]):
            job["speed"] = int(E["LAT_SPEED"]) << 20
        q.cmd("block-stream", **job)
        if during_secs:
            j0, c0 = job_offset(q), time.time()
            during = fio_p99(sock, during_secs, gib)
            j1, c1 = job_offset(q), time.time()
            if j1 is None:
                raise RuntimeError(f"{kind}: the stream ended before the client did: raise GIB")
            # The job's progress per second while the client read (it must
            # go on; progress also counts ranges with nothing to copy).
            during = during + ((j1 - (j0 or 0)) / (c1 - c0),)
        ev = q.wait("BLOCK_JOB_COMPLETED")
        took = time.time() - t0
        if "error" in ev["data"]:
            raise RuntimeError(f"{kind}: {ev}")
        if during_secs:
            q.cmd("block-export-del", id="e1")
            q.wait("BLOCK_EXPORT_DELETED")
            q.cmd("nbd-server-stop")
        q.cmd("blockdev-del", **{"node-name": "ov"})
        q.cmd("blockdev-del", **{"node-name": "remote"})
        q.cmd("quit")
        q.close()
        p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
        src.terminate()
        src.wait(30)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ov, names[-1]],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{kind}: the streamed image differs from the chain: {r.stdout}")
    return (idle, during) if during_secs else took


def job_offset(q):
    """The stream's offset, or None once it ended."""
    jobs = q.cmd("query-block-jobs")
    return jobs[0]["offset"] if jobs else None


def fio_p99(sock, secs, gib):
    """4 KiB random reads at QD 1 over the export on `sock` for `secs`: (p50, p99) in µs."""
    r = subprocess.run(["fio", "--name=lat", "--ioengine=nbd", f"--uri=nbd+unix:///ov?socket={sock}",
                        "--rw=randread", "--bs=4k", "--iodepth=1", "--time_based=1",
                        f"--runtime={secs}", f"--size={gib}G", "--output-format=json"]
                       + ([f"--write_lat_log={E['LAT_LOG']}", "--log_offset=1"] if E.get("LAT_LOG") else []),
                       capture_output=True, text=True, timeout=secs + 120)
    if r.returncode != 0:
        raise RuntimeError(f"fio: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]
    if j["io_bytes"] == 0 or j.get("short_ios", 0) or j.get("drop_ios", 0):
        raise RuntimeError(f"fio read nothing or failed: {j}")
    pct = j["clat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000, j["total_ios"]


def main():
    gib = int(E["GIB"])
    names = make_chain(E["DIR"], gib)
    tmp = os.path.join(E["DIR"], "run")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pki = make_pki(os.path.join(tmp, "pki"))
    nets_up()
    res = {}
    try:
        k = 0
        for tls in E["TLS"].split():
            on = tls == "on"
            for r in range(int(E["RUNS"])):
                kinds = E["KINDS"].split()
                order = kinds[k % len(kinds):] + kinds[:k % len(kinds)]
                if k % 2:
                    order.reverse()
                k += 1
                for kind in order:
                    t = migrate(kind, names, pki, on, tmp)
                    res.setdefault((tls, kind), []).append(t)
                    print(f"tls={tls} {kind}: {t:.2f}s (data compared equal)", flush=True)
        lat = {}
        if E["LAT"] == "1":
            for tls in E["TLS"].split():
                for kind in E["KINDS"].split():
                    secs = (int(E["LAT_SECS"]) if int(E["LAT_SPEED"]) or (tls, kind) not in res
                            else max(1, int(0.7 * min(res[(tls, kind)]))))
                    lat[(tls, kind)] = migrate(kind, names, pki, tls == "on", tmp, secs)
                    (i50, i99, n_i), (d50, d99, n_d, bps) = lat[(tls, kind)]
                    print(f"tls={tls} {kind}: client read p50/p99 idle {i50:.0f}/{i99:.0f} us "
                          f"({n_i} reads), during the stream {d50:.0f}/{d99:.0f} us ({n_d} reads, "
                          f"{secs} s; the job progressed meanwhile at {bps / MiB:.0f} MiB/s): "
                          f"p99 ratio {d99 / i99:.2f} (data compared equal)", flush=True)
    finally:
        nets_down()
    print(f"\n{gib} GiB three-layer chain streamed over NBD between namespaces "
          "(source: qemu-storage-daemon; best of runs)")
    for tls in E["TLS"].split():
        if any((tls, k) not in res for k in ("sluice", "qsd", "qsd-best")):
            continue  # RUNS=0 (the latency phase only) or KINDS without them all
        s, q, b = min(res[(tls, "sluice")]), min(res[(tls, "qsd")]), min(res[(tls, "qsd-best")])
        print(f"  tls={tls:3}  sluice {s:6.2f}s  qsd (defaults) {q:6.2f}s  qsd (aio=io_uring) {b:6.2f}s  "
              f"sluice is {q / s:.2f}x / {b / s:.2f}x faster")
    if lat:
        how = f"at {E['LAT_SPEED']} MiB/s" if int(E["LAT_SPEED"]) else "at full speed"
        print(f"\nclient read p99 on the destination, during the stream ({how}) / idle (goal: at most 2)")
        for (tls, kind), ((_, i99, _), (_, d99, _, bps)) in sorted(lat.items()):
            print(f"  tls={tls:3}  {kind:8}  idle {i99:7.0f} us  during {d99:7.0f} us  ratio {d99 / i99:.2f}"
                  f"  (job progress meanwhile {bps / MiB:5.0f} MiB/s)")


main()
PYEOF

#!/usr/bin/env bash
# A/B of two sluice builds on the data path, side by side in one run: did a
# change make anything slower? Each workload runs ROUNDS times per build, the
# builds alternating which goes first; the median of each and NEW/OLD print.
#
#   OLD=/path/to/old/sluice scripts/bench/ab.sh [NEW]     (NEW: target/release/sluice)
#
# Workloads (4 KiB unless named), each on one reactor:
#   null randread QD128           sluice perf --null (untouched buffers, as SPDK's null bdev)
#   malloc randread/randwrite QD32
#   qcow2 on malloc randread/randwrite QD64   (a daemon, every cluster allocated first)
#   uring O_DIRECT randread QD32  (a raw file in BENCH_DIR)
#   nbd export of malloc: fio's nbd engine, randread/randwrite QD32 (server on
#     core 0, fio on core 1)
# Before any time counts, each build passes a `verify` run (write a pattern,
# read it back) on malloc, on qcow2 and on the uring file, and a fio verify
# pass through its NBD export.
# The peer here is the other sluice build: no QEMU runs (the QSD comparisons
# of the same workloads are qcow2.sh, nbd.sh, uring_randread.sh). Caches are
# dropped before every run (only the uring workload touches a file).
# The stream job is compared by scripts/bench/stream.sh, which takes SLUICE= too.
#
# Env: T seconds per run (4), ROUNDS (3), BENCH_DIR (/var/tmp), WORKLOADS (all
# of: null malloc qcow2 uring nbd).
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=${OLD:?OLD=path of the build to compare against}
NEW=${1:-target/release/sluice}
[ -x "$NEW" ] || cargo build --release -q -p sluice --bin sluice
T=${T:-4}; ROUNDS=${ROUNDS:-3}; BENCH_DIR=${BENCH_DIR:-/var/tmp}
WORKLOADS=${WORKLOADS:-"null malloc qcow2 uring nbd"}
command -v fio >/dev/null || { echo "needs fio (apt-get install fio)" >&2; exit 1; }
exec python3 - "$OLD" "$NEW" "$T" "$ROUNDS" "$BENCH_DIR" "$WORKLOADS" <<'PY'
import json, os, shutil, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, "scripts/bench")
from chainbench import drop_caches, fio_verify_nbd

old, new, t, rounds, bench_dir, workloads = sys.argv[1:]
rounds, workloads = int(rounds), workloads.split()
builds = {"old": old, "new": new}


def run(*a, **kw):
    return subprocess.run([str(x) for x in a], check=True, capture_output=True, text=True, **kw).stdout


class Daemon:
    """`sluice serve` on core 0 with a private runtime directory."""

    def __init__(self, binary):
        self.bin, self.dir = binary, tempfile.mkdtemp(prefix="ab-")
        self.sock = os.path.join(self.dir, "sluice.sock")
        self.nbd = os.path.join(self.dir, "nbd.sock")
        self.log = open(os.path.join(self.dir, "log"), "w")
        self.p = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "-m", "0x1",
                                   "--runtime-dir", self.dir, "--nbd-listen", f"unix:{self.nbd}"],
                                  stdout=self.log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, RUST_LOG="warn"))
        for _ in range(200):
            if os.path.exists(self.sock):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{binary} serve did not start")

    def rpc(self, method, **kw):
        return run(self.bin, "rpc", "-s", self.sock, method, *(f"{k}={v}" for k, v in kw.items()))

    def perf(self, *a):
        return self.perf_all(*a)["total"]

    def perf_all(self, *a):
        return json.loads(run(self.bin, "perf", "-s", self.sock, *a, "--json"))

    def stop(self):
        self.p.terminate()
        self.p.wait(20)
        with open(os.path.join(self.dir, "log")) as f:
            if "panicked" in f.read():
                raise RuntimeError(f"{self.bin} panicked (log in {self.dir})")
        shutil.rmtree(self.dir)


def local_perf(binary, *a):
    out = run(binary, "perf", *a, "-m", "0x1", "--json", env=dict(os.environ, RUST_LOG="error"))
    return json.loads(out)["total"]


def null_randread(b):
    return {"null randread QD128": local_perf(b, "--null", "N0:1024:512:nozero", "-q", "128",
                                              "-w", "randread", "-t", t)["iops"]}


def malloc_rand(b):
    r = {}
    for w in ("randread", "randwrite"):
        r[f"malloc {w} QD32"] = local_perf(b, "--malloc", "M0:1024:512", "-q", "32", "-w", w, "-t", t)["iops"]
    return r


def qcow2_rand(b):
    d = Daemon(b)
    try:
        d.rpc("bdev_malloc_create", name="M0", num_blocks=524288, block_size=512)
        d.rpc("bdev_qcow2_create", name="Q0", base_bdev="M0", size=201326592)
        d.perf("-T", "Q0", "-w", "write", "-o", "1m", "-q", "8", "-t", "1")
        return {f"qcow2/malloc {w} QD64": d.perf("-T", "Q0", "-w", w, "-q", "64", "-t", t)["iops"]
                for w in ("randread", "randwrite")}
    finally:
        d.stop()


def uring_file():
    path = os.path.join(bench_dir, "ab-uring.raw")
    if not os.path.exists(path) or os.path.getsize(path) != 1 << 30:
        run("fio", "--name=fill", f"--filename={path}", "--size=1g", "--rw=write", "--bs=1m",
            "--direct=1", "--ioengine=psync")
    return path


def uring_randread(b):
    path = uring_file()
    return {"uring O_DIRECT randread QD32": local_perf(b, "--file", path, "-q", "32", "-w", "randread",
                                                      "-t", t)["iops"]}


def nbd_rand(b):
    d = Daemon(b)
    try:
        d.rpc("bdev_malloc_create", name="M0", num_blocks=2097152, block_size=512)
        d.rpc("block-export-add", type="nbd", id="e0", **{"node-name": "M0", "writable": "true"})
        sock = d.nbd
        fio_verify_nbd(f"nbd+unix:///M0?socket={sock}")
        r = {}
        for w in ("randread", "randwrite"):
            o = run("taskset", "-c", "1", "fio", "--name=ab", "--ioengine=nbd", f"--uri=nbd+unix:///M0?socket={sock}",
                    f"--rw={w}", "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={t}",
                    "--output-format=json")
            j = json.loads(o[o.index("{"):])["jobs"][0]
            r[f"nbd/malloc {w} QD32"] = j["read" if w == "randread" else "write"]["iops"]
        return r
    finally:
        d.stop()


def check(b, what, j):
    if not j["ok"] or j["errors"] or j["total"]["io_failed"] or not j["total"]["iops"]:
        raise RuntimeError(f"{b}: verify on {what} failed: {j}")


def verify(b):
    out = run(b, "perf", "--malloc", "V0:64:512", "-q", "16", "-w", "verify", "-t", "1", "-m", "0x1", "--json",
              env=dict(os.environ, RUST_LOG="error"))
    check(b, "malloc", json.loads(out))
    if "uring" in workloads:
        out = run(b, "perf", "--file", uring_file(), "-q", "16", "-w", "verify", "-t", "1", "-m", "0x1", "--json",
                  env=dict(os.environ, RUST_LOG="error"))
        check(b, "uring", json.loads(out))
    d = Daemon(b)
    try:
        d.rpc("bdev_malloc_create", name="M0", num_blocks=131072, block_size=512)
        d.rpc("bdev_qcow2_create", name="Q0", base_bdev="M0", size=33554432)
        check(b, "qcow2", d.perf_all("-T", "Q0", "-w", "verify", "-q", "16", "-t", "1"))
    finally:
        d.stop()


table = {"null": null_randread, "malloc": malloc_rand, "qcow2": qcow2_rand, "uring": uring_randread,
         "nbd": nbd_rand}
for name, b in builds.items():
    verify(b)
    print(f"{name}: {b}: verify passed (malloc, qcow2{', uring file' if 'uring' in workloads else ''}; NBD is verified before its runs)", flush=True)
res = {}
for r in range(rounds):
    order = ("old", "new") if r % 2 == 0 else ("new", "old")
    for w in workloads:
        for who in order:
            drop_caches()
            for k, v in table[w](builds[who]).items():
                res.setdefault(k, {"old": [], "new": []})[who].append(v)
print(f"{'workload':<34} {'old IOPS':>10} {'new IOPS':>10} {'new/old':>8}   (median of {rounds}, {t} s each; "
      f"load {open('/proc/loadavg').read().split()[:3]})")
for k, v in res.items():
    o, n = statistics.median(v["old"]), statistics.median(v["new"])
    print(f"{k:<34} {o:>10.0f} {n:>10.0f} {n / o:>8.2f}")
PY

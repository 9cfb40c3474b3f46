#!/usr/bin/env bash
# vhost-user-blk: the service's cost per request, sluice vs qemu-storage-daemon
# 10, side by side. A QEMU 7.2 guest (TCG; scripts/vm/vhost/) runs 4 KiB random
# reads at QD 32 (scripts/bench/vhost_randread.c: native AIO, O_DIRECT, every
# block checked to hold its own number) on a data disk served over
# vhost-user-blk by each service in turn, from the same raw file (page cache
# dropped before each run). Around the measured window the host samples:
#   sluice: reactor busy time (framework_get_reactors: the reactors' CPU time
#           in iterations that did work) and the process's CPU time outside the
#           reactor threads (io-wq workers doing buffered file reads), per
#           request; also the time the reactors sat runnable but preempted
#           (reactor_wait: how loaded the machine was for them);
#   QSD:    its process CPU time per request (defaults; and "best":
#           aio=io_uring, the export in an iothread).
# Requests are the guest's completed reads. Order alternates between rounds.
# TCG makes the guest's IOPS meaningless as a speed: only the per-request
# costs are compared. Goal: sluice's reactor busy time per request at most
# half of QSD's CPU time per request.
#
#   scripts/bench/vhost.sh            # ROUNDS=2 SECS=15 WARMUP=3 SIZE_MB=256
# SLUICE: the binary (default: cargo build --release). SLUICE_B: a second
# sluice binary (say, the one before a change), run as "sluice-b" in every
# round next to the others, with its ratios to SLUICE printed. KINDS: which
# servers to run (default "sluice qsd qsd-best", plus sluice-b when given;
# "sluice-co" is SLUICE with SPDK's interrupt coalescing on, set through
# vhost_controller_set_coalescing to COALESCING="delay_base_us iops_threshold",
# default "50 10000"; "sluice" and "sluice-b" run with SPDK's default, off).
# PIN=1 (default): each service on CPU 0 (sluice's reactor pinned there, as
# it runs by default; QSD under taskset) and the guest's QEMU on CPU 1, as a
# storage node keeps its cores apart from its VMs'. Unpinned (PIN=0) the
# guest's threads preempt the reactor inside busy iterations, and that wait
# counts in its busy time (not in QSD's CPU time).
# BACKING=file (default): the raw file, read through the page cache.
# BACKING=null: a null-co node of the same size reading as zeroes
# (read-zeroes=on) on both sides, the guest checking each block comes back
# zeroed: the export's own cost, without the file read both services pay.
# The table also gives each service's read and write system calls per 100
# requests (/proc/PID/io): the call eventfd's writes are most of the writes;
# and for sluice, requests per busy poll of the virtqueue (thread_get_pollers;
# a busy poll took requests from the avail ring or signalled the guest).
# Results: a table on stdout, JSON lines in $OUT (default bench-vhost.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH_ROOT=$PWD
export VM_RUN=${VM_RUN:-$PWD/scripts/vm/work/run-bench}
set --
# shellcheck source=../vm/vhost/run.sh
source scripts/vm/vhost/run.sh
if [[ -z ${SLUICE:-} ]]; then
    # The workspace's feature set, as scripts/test.sh builds it (lib.sh's build_sluice).
    (cd "$BENCH_ROOT" && cargo build -q --release --workspace --bins)
    SLUICE=$BENCH_ROOT/target/release/sluice
fi
prepare_guest
gcc -O2 -static -Wall -o "$RUN/randread" "$BENCH_ROOT/scripts/bench/vhost_randread.c"
guest_initramfs
R="$WORK/root"
export SLUICE SLUICE_B=${SLUICE_B:-} KINDS=${KINDS:-} RUN KERNEL QEMU_ROOT=$R MEM SMP
export ROUNDS=${ROUNDS:-2} SECS=${SECS:-15} WARMUP=${WARMUP:-3} SIZE_MB=${SIZE_MB:-256}
export COALESCING=${COALESCING:-50 10000} PIN=${PIN:-1} BACKING=${BACKING:-file}
export OUT=${OUT:-$BENCH_ROOT/bench-vhost.jsonl} DATA_DIR=${DATA_DIR:-/var/tmp/sluice-bench-vhost}
PY=$BENCH_ROOT/.venv/bin/python
export BENCH_ROOT
exec "$PY" - <<'PYEOF'
import json, os, re, shutil, struct, subprocess, sys, time
from qemu.qmp.legacy import QEMUMonitorProtocol
sys.path.insert(0, os.path.join(os.environ["BENCH_ROOT"], "scripts/bench"))
from chainbench import threads_cpu

E = os.environ
RUN, DATA = E["RUN"], E["DATA_DIR"]
R = E["QEMU_ROOT"]
SECS, WARMUP, ROUNDS = float(E["SECS"]), float(E["WARMUP"]), int(E["ROUNDS"])
PIN = E["PIN"] == "1"
NULL = E["BACKING"] == "null"
if E["BACKING"] not in ("file", "null"):
    raise SystemExit(f"BACKING={E['BACKING']}: file or null")
os.makedirs(DATA, exist_ok=True)
data = os.path.join(DATA, "data.raw")
size = int(E["SIZE_MB"]) << 20
if not os.path.exists(data) or os.path.getsize(data) != size:
    with open(data, "wb") as f:  # each 4 KiB block starts with its number
        for b in range(size // 4096):
            f.write(struct.pack("<Q", b) + bytes(4088))


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def qmp(path):
    for _ in range(200):
        if os.path.exists(path):
            try:
                q = QEMUMonitorProtocol(path)
                q.connect(negotiate=True)
                return q
            except Exception:
                pass
        time.sleep(0.05)
    raise SystemExit(f"no QMP at {path}")


def cmd(q, name, args):
    r = q.cmd_raw(name, args)
    if "return" not in r:
        raise SystemExit(f"{name} {args}: {r}")
    return r["return"]


def rpc(sock, method, params=None):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    s.sendall(json.dumps(req).encode())
    buf = b""
    while True:
        buf += s.recv(65536)
        try:
            r = json.loads(buf)
        except ValueError:
            continue
        if "result" not in r:
            raise SystemExit(f"{method} {params}: {r}")
        return r["result"]


def start(kind, d):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    sock = os.path.join(d, "vhost.sock")
    if kind.startswith("sluice"):
        binary = E["SLUICE_B"] if kind == "sluice-b" else E["SLUICE"]  # sluice-co: SLUICE
        pin = [] if PIN else ["--no-pin"]
        p = subprocess.Popen([binary, "serve", "--runtime-dir", d, *pin, "-m", "0x1"],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
        q = qmp(os.path.join(d, "sluice-qmp.sock"))
        if NULL:
            cmd(q, "blockdev-add", {"driver": "null-co", "size": size, "read-zeroes": True, "node-name": "f"})
        else:
            cmd(q, "blockdev-add", {"driver": "file", "filename": data, "node-name": "f", "read-only": True})
        cmd(q, "block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "f",
                                    "addr": {"type": "unix", "path": sock}})
        if kind == "sluice-co":
            base, thr = (int(x) for x in E["COALESCING"].split())
            rpc(os.path.join(d, "sluice.sock"), "vhost_controller_set_coalescing",
                {"ctrlr": "e", "delay_base_us": base, "iops_threshold": thr})
    else:
        best = kind == "qsd-best"
        mon = os.path.join(d, "qmp.sock")
        a = (["taskset", "-c", "0"] if PIN else []) + ["qemu-storage-daemon", "--chardev", f"socket,path={mon},server=on,wait=off,id=m",
             "--monitor", "chardev=m",
             "--blockdev", f"driver=null-co,node-name=f,size={size},read-zeroes=on" if NULL else
             f"driver=file,node-name=f,filename={data},read-only=on" + (",aio=io_uring" if best else "")]
        exp = f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock}"
        if best:
            a += ["--object", "iothread,id=io0"]
            exp += ",iothread=io0"
        a += ["--export", exp]
        p = subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
        q = qmp(mon)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return p, q, sock


def reactor_wait(pid):
    """Seconds the reactor threads sat runnable but off the CPU (schedstat's
    run delay): how loaded the machine was for them."""
    t = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{tid}/comm").read().startswith("reactor_"):
                t += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return t / 1e9


def syscalls(pid):
    """The process's read and write system calls so far (/proc/PID/io): the
    call eventfd's writes are most of its writes."""
    io = dict(line.split(":") for line in open(f"/proc/{pid}/io"))
    return int(io["syscr"]), int(io["syscw"])


def sample(kind, p, d):
    r, w = syscalls(p.pid)
    s = {"reads": r, "writes": w}
    if kind.startswith("sluice"):
        r = rpc(os.path.join(d, "sluice.sock"), "framework_get_reactors")
        busy = sum(x["busy"] for x in r["reactors"]) / r["tick_rate"]
        s["time"] = {"busy": busy, "other_cpu": threads_cpu(p.pid, "reactor_"), "cpu": threads_cpu(p.pid),
                     "reactor_wait": reactor_wait(p.pid)}
        tp = rpc(os.path.join(d, "sluice.sock"), "thread_get_pollers")
        s["queue_busy_polls"] = sum(x["busy_count"] for t in tp["threads"] for x in t["active_pollers"]
                                    if x["name"] == "vhost-blk-queue")
    else:
        s["time"] = {"cpu": threads_cpu(p.pid)}
    return s


def run(kind, rnd):
    d = os.path.join(RUN, f"svc-{kind}")
    drop_caches()
    p, q, sock = start(kind, d)
    console = os.path.join(d, "console.log")
    qemu = (["taskset", "-c", "1"] if PIN else []) + [f"{R}/usr/bin/qemu-system-x86_64", "-L", f"{R}/usr/share/qemu", "-L", f"{R}/usr/share/seabios",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot", "-m", E["MEM"], "-smp", E["SMP"],
            "-machine", "q35,accel=tcg", "-cpu", "max", "-initrd", f"{RUN}/initrd.gz", "-kernel", E["KERNEL"],
            "-append", f"console=ttyS0 quiet panic=-1 sluice_bench=32,{WARMUP},{SECS},4096{',zero' if NULL else ''}",
            "-object", f"memory-backend-memfd,id=mem,size={E['MEM']},share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vu,path={sock}", "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1"]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{R}/usr/lib/x86_64-linux-gnu")
    vm = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=open(console, "wb"), stderr=subprocess.STDOUT, env=env)
    s0 = s1 = None
    t_end = time.time() + 600
    while time.time() < t_end:
        txt = open(console, "rb").read().decode("utf-8", "replace")
        if s0 is None and "READER-START" in txt:
            s0 = sample(kind, p, d)
        m = re.search(r"READER-END ops=(\d+) secs=([\d.]+)", txt)
        if m and s0 is not None:
            s1 = sample(kind, p, d)
            break
        if "SLUICE-VM-RESULT" in txt or vm.poll() is not None:
            break
        time.sleep(0.05)
    vm.wait(120)
    txt = open(console, "rb").read().decode("utf-8", "replace")
    p.terminate()
    p.wait(30)
    if "panicked" in open(os.path.join(d, "log")).read():
        raise SystemExit(f"{kind} panicked")
    if not m or s1 is None or "SLUICE-VM-RESULT: PASS" not in txt:
        raise SystemExit(f"{kind}: the guest's reads failed or did not finish:\n{txt[-3000:]}")
    ops, secs = int(m.group(1)), float(m.group(2))
    res = {"server": kind, "round": rnd, "ops": ops, "secs": secs, "guest_iops_tcg": round(ops / secs)}
    for k in s0["time"]:
        res[k + "_us_per_req"] = round((s1["time"][k] - s0["time"][k]) / ops * 1e6, 2)
    for k in ("reads", "writes"):
        res[k + "_per_100_req"] = round((s1[k] - s0[k]) / ops * 100, 2)
    if "queue_busy_polls" in s0:
        res["req_per_busy_queue_poll"] = round(ops / max(1, s1["queue_busy_polls"] - s0["queue_busy_polls"]), 2)
    print(json.dumps(res), flush=True)
    with open(E["OUT"], "a") as f:
        f.write(json.dumps(res) + "\n")
    return res


def run_clean(kind, rnd):
    """run(), leaving no service or guest behind when it fails."""
    before = set(int(x) for x in os.listdir("/proc") if x.isdigit())
    try:
        return run(kind, rnd)
    except BaseException:
        for pid in set(int(x) for x in os.listdir("/proc") if x.isdigit()) - before:
            try:
                if os.getppid() != pid and open(f"/proc/{pid}/stat").read().split()[3] == str(os.getpid()):
                    os.kill(pid, 15)
            except OSError:
                pass
        raise


kinds = E["KINDS"].split() or ["sluice", "qsd", "qsd-best"]
if E["SLUICE_B"] and "sluice-b" not in kinds:
    kinds.insert(1, "sluice-b")
load = os.getloadavg()
results = []
for rnd in range(ROUNDS):
    order = kinds if rnd % 2 == 0 else kinds[::-1]
    for k in order:
        results.append(run_clean(k, rnd))
print(f"\nload average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores; noisy above ~2)")
print(f"{'server':10} {'round':>5} {'guest IOPS (TCG)':>17} {'reactor busy us/req':>20} "
      f"{'other CPU us/req':>17} {'process CPU us/req':>19} {'reactor wait us/req':>20} "
      f"{'read/write syscalls per 100 req':>32} {'req per busy queue poll':>24}")
for r in results:
    print(f"{r['server']:10} {r['round']:>5} {r['guest_iops_tcg']:>17} {r.get('busy_us_per_req', ''):>20} "
          f"{r.get('other_cpu_us_per_req', ''):>17} {r['cpu_us_per_req']:>19} "
          f"{r.get('reactor_wait_us_per_req', ''):>20} "
          f"{r['reads_per_100_req']:>15} / {r['writes_per_100_req']:<14} "
          f"{r.get('req_per_busy_queue_poll', ''):>24}")
def med(k, f):
    v = sorted(r[f] for r in results if r["server"] == k)
    return v[len(v) // 2]
def busy_work(k):
    b = med(k, "busy_us_per_req")
    return b, b + med(k, "other_cpu_us_per_req")
for s in ("sluice", "sluice-co"):
    if s not in kinds:
        continue
    busy, work = busy_work(s)
    what = s + (f" (coalescing {E['COALESCING']})" if s == "sluice-co" else "")
    for k in ("qsd", "qsd-best"):
        if k not in kinds:
            continue
        c = med(k, "cpu_us_per_req")
        print(f"{what} reactor busy / {k} CPU per request: {busy / c:.2f} (goal <= 0.5); "
              f"busy + non-reactor CPU / {k} CPU: {work / c:.2f}")
    for b in ("sluice-b", "sluice"):
        if b in kinds and b != s:
            b_busy, b_work = busy_work(b)
            print(f"{s} / {b}: reactor busy {busy / b_busy:.2f}, "
                  f"busy + non-reactor CPU {work / b_work:.2f}")
PYEOF

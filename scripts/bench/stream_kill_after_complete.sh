#!/usr/bin/env bash
# What a completed stream leaves on disk if the daemon is killed (SIGKILL) right
# after BLOCK_JOB_COMPLETED: qemu-storage-daemon and sluice, same 1 GiB chain as
# scripts/bench/stream.sh (built by it first), page cache. For each it prints the
# top image's backing file, its allocation and whether it still reads the same as
# the chain did before the stream (qemu-img compare against the pristine top).
# sluice runs twice: by default (the copy made durable before the header drops the
# backing file) and with block-stream's x-durable=false (no flush, as QEMU); QSD
# with its defaults (aio=threads) and with aio=io_uring.
# Not a timing: no ratios. Caches are not dropped: a SIGKILL leaves the page
# cache (and so what was written) in place, which is what this checks; losing
# it would need a power cut, which the qcow2 crash tests simulate
# instead. Each result's content is compared with the pristine chain.
#
#   scripts/bench/stream_kill_after_complete.sh        # DIR=/dev/shm/sluice-bench
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${DIR:-/dev/shm/sluice-bench}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "needs the test venv (scripts/test.sh makes it)" >&2; exit 1; }
[ -f "$DIR/chainbench-1G.done" ] || { echo "no chain in $DIR: run SIZES=1 STORAGE=tmpfs MODES=full LATENCY=0 scripts/bench/stream.sh first" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
    cargo build --release -p sluice --bin sluice >&2
    SLUICE=$PWD/target/release/sluice
fi
export SLUICE DIR
exec "$PY" - <<'PYEOF'
import json, os, shutil, signal, subprocess, tempfile, time
from qemu.qmp.legacy import QEMUMonitorProtocol

d = os.environ["DIR"]
names = [f"{d}/cb-{n}-1G.qcow2" for n in ("base", "mid", "top")]  # chainbench.make_chain's


def qmp(path):
    for _ in range(200):
        if os.path.exists(path):
            break
        time.sleep(0.05)
    q = QEMUMonitorProtocol(path)
    q.connect(negotiate=True)
    return q


def stream_then_kill(p, q, device, **extra):
    q.cmd_raw("block-stream", {"job-id": "j0", "device": device, **extra})
    while True:
        ev = q.pull_event(wait=5)
        if ev and ev["event"] == "BLOCK_JOB_COMPLETED":
            assert "error" not in ev["data"], ev
            break
    p.send_signal(signal.SIGKILL)
    p.wait()


def qsd(tmp, aio="threads"):
    sock = os.path.join(tmp, "qsd.sock")
    args = ["qemu-storage-daemon"]
    for n, f in zip(("base", "mid", "top"), names):
        args += ["--blockdev", json.dumps({"driver": "file", "node-name": f"{n}-file", "filename": f,
                                           "aio": aio, "cache": {"direct": False, "no-flush": False}})]
        back = {"base": None, "mid": "base", "top": "mid"}[n]
        args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": n, "file": f"{n}-file", "backing": back})]
    args += ["--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "chardev=m0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stream_then_kill(p, qmp(sock), "top")


def sluice(tmp, **extra):
    p = subprocess.Popen([os.environ["SLUICE"], "serve", "--runtime-dir", tmp, "-m", "0x1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    q = qmp(os.path.join(tmp, "sluice-qmp.sock"))
    q.cmd_raw("bdev_qcow2_open", {"node_name": "base", "filename": names[0], "no_backing": True, "direct": False})
    q.cmd_raw("bdev_qcow2_open", {"node_name": "mid", "filename": names[1], "backing": "base", "direct": False})
    q.cmd_raw("bdev_qcow2_open", {"name": "drive0", "node_name": "top", "filename": names[2], "backing": "mid",
                                  "direct": False})
    stream_then_kill(p, q, "drive0", **extra)


for who, run in (("qemu-storage-daemon", qsd), ("qsd aio=io_uring", lambda tmp: qsd(tmp, "io_uring")),
                 ("sluice", sluice),
                 ("sluice x-durable=false", lambda tmp: sluice(tmp, **{"x-durable": False}))):
    shutil.copyfile(names[2] + ".orig", names[2])
    with tempfile.TemporaryDirectory(prefix="sl-kill-") as tmp:
        run(tmp)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", names[2]],
                                     capture_output=True, text=True, check=True).stdout)
    chk = subprocess.run(["qemu-img", "check", names[2]], capture_output=True, text=True)
    alloc = [l for l in chk.stdout.splitlines() if "allocated" in l]
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", names[2] + ".orig", names[2]],
                         capture_output=True, text=True)
    print(f"{who:>24}: backing file {info.get('backing-filename', 'none')!r}; check exit {chk.returncode}; "
          f"{alloc[0] if alloc else ''}; content {'same as before the stream' if cmp.returncode == 0 else 'DIFFERS: ' + cmp.stdout.strip()}")
shutil.copyfile(names[2] + ".orig", names[2])
PYEOF

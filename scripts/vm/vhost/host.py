"""Host side of the VM whose disk moves under it (scripts/vm/vhost/run.sh).

Sets up the data disk in a running sluice (a qcow2 node, exported over
vhost-user-blk or NBD), boots QEMU with it (the command after `--`), waits
until the guest's workload runs, then moves the disk under it over QMP:
blockdev-snapshot-sync, block-stream, blockdev-mirror + pivot, a snapshot and
an active block-commit + pivot; checks that the export followed each step and
that the guest kept writing throughout; tells the guest to stop (second serial
port); and after QEMU exits checks the final image with qemu-img (check, and
its contents' SHA-256 against the one the guest printed for its whole disk).
Prints SLUICE-VM-HOST: PASS or FAIL; exits 0 only on PASS with the guest's
SLUICE-VM-RESULT: PASS."""

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

SIZE = "256M"


class Failure(Exception):
    pass


def log(*a):
    print("host:", *a, file=sys.stderr, flush=True)


class Qmp:
    def __init__(self, path):
        self.q = QEMUMonitorProtocol(path)
        self.q.connect(negotiate=True)
        self.events = []

    def cmd(self, name, **args):
        r = self.q.cmd_raw(name, {k.replace("_", "-"): v for k, v in args.items()})
        if "return" not in r:
            raise Failure(f"{name} {args}: {r}")
        return r["return"]

    def wait_event(self, name, job, timeout):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and e.get("data", {}).get("device") == job:
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                raise Failure(f"no {name} for {job} within {timeout}s")
            try:
                e = self.q.pull_event(wait=min(left, 1.0))
            except Exception:
                e = None
            if e is not None:
                self.events.append(e)

    def job_done(self, job, timeout):
        e = self.wait_event("BLOCK_JOB_COMPLETED", job, timeout)
        if e["data"].get("error"):
            raise Failure(f"job {job} failed: {e['data']}")
        return e

    def exported_node(self):
        ex = self.cmd("query-block-exports")
        if len(ex) != 1:
            raise Failure(f"exports: {ex}")
        return ex[0]["node-name"]


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout


def guest_round(console):
    try:
        with open(console, "rb") as f:
            txt = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return 0, ""
    rounds = [int(m) for m in re.findall(r"guest: round (\d+)", txt)]
    return (rounds[-1] if rounds else 0), txt


def wait_guest(console, qemu, want_round, timeout):
    t0 = time.time()
    while True:
        r, txt = guest_round(console)
        if r >= want_round:
            return r
        if "SLUICE-VM-RESULT" in txt or qemu.poll() is not None:
            raise Failure("the guest ended before its workload ran:\n" + txt[-3000:])
        if time.time() - t0 > timeout:
            raise Failure(f"the guest's workload did not reach round {want_round} in {timeout}s:\n" + txt[-3000:])
        time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qmp", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--mode", choices=["vhost", "nbd"], required=True)
    ap.add_argument("--mem", required=True)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("qemu", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    qemu_cmd = [x for x in a.qemu if x != "--"]
    run = a.run
    img = lambda n: os.path.join(run, n)  # noqa: E731
    for n in ("base.qcow2", "s1.qcow2", "m.qcow2", "s2.qcow2"):
        if os.path.exists(img(n)):
            os.unlink(img(n))
    qemu_img("create", "-q", "-f", "qcow2", img("base.qcow2"), SIZE)
    qemu_img("create", "-q", "-f", "qcow2", img("m.qcow2"), SIZE)
    q = Qmp(a.qmp)
    q.cmd("blockdev-add", driver="qcow2", node_name="n0", file={"driver": "file", "filename": img("base.qcow2")})
    if a.mode == "vhost":
        sock = img("vhost.sock")
        q.cmd("block-export-add", type="vhost-user-blk", id="disk", node_name="n0", writable=True,
              num_queues=2, addr={"type": "unix", "path": sock})
        qemu_cmd += ["-object", f"memory-backend-memfd,id=mem,size={a.mem},share=on", "-numa", "node,memdev=mem",
                     "-chardev", f"socket,id=vu,path={sock}", "-device", "vhost-user-blk-pci,chardev=vu,num-queues=2"]
    else:
        sock = img("nbd.sock")
        q.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        q.cmd("block-export-add", type="nbd", id="disk", node_name="n0", writable=True)
        qemu_cmd += ["-blockdev", f"driver=nbd,node-name=d0,server.type=unix,server.path={sock},export=n0",
                     "-device", "virtio-blk-pci,drive=d0,num-queues=2"]
    ctl = img("ctl.sock")
    console = img("console.log")
    qemu_cmd += ["-serial", f"unix:{ctl},server=on,wait=off"]
    log("booting:", " ".join(qemu_cmd))
    t_boot = time.time()
    with open(console, "wb") as out:
        qemu = subprocess.Popen(qemu_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    ok = False
    try:
        r0 = wait_guest(console, qemu, 6, a.timeout)
        log(f"guest workload at round {r0} after {time.time() - t_boot:.0f}s; moving the disk under it")
        t_jobs = time.time()
        steps = []

        def step(name, f):
            t = time.time()
            f()
            steps.append(f"{name} {time.time() - t:.1f}s (guest round {guest_round(console)[0]})")
            log(steps[-1])

        def snap1():
            q.cmd("blockdev-snapshot-sync", node_name="n0", snapshot_file=img("s1.qcow2"),
                  snapshot_node_name="n1", format="qcow2")
            if q.exported_node() != "n1":
                raise Failure(f"after the snapshot the export is on {q.exported_node()}")

        def stream():
            q.cmd("block-stream", job_id="st", device="n1")
            q.job_done("st", 600)

        def mirror():
            q.cmd("blockdev-add", driver="qcow2", node_name="m", file={"driver": "file", "filename": img("m.qcow2")})
            q.cmd("blockdev-mirror", job_id="mi", device="n1", target="m", sync="full")
            q.wait_event("BLOCK_JOB_READY", "mi", 600)
            q.cmd("block-job-complete", device="mi")
            q.job_done("mi", 600)
            if q.exported_node() != "m":
                raise Failure(f"after the mirror's pivot the export is on {q.exported_node()}")

        def commit():
            q.cmd("blockdev-snapshot-sync", node_name="m", snapshot_file=img("s2.qcow2"),
                  snapshot_node_name="n2", format="qcow2")
            if q.exported_node() != "n2":
                raise Failure(f"after the second snapshot the export is on {q.exported_node()}")
            time.sleep(3)  # let the guest write into the overlay
            q.cmd("block-commit", job_id="co", device="n2")
            q.wait_event("BLOCK_JOB_READY", "co", 600)
            q.cmd("block-job-complete", device="co")
            q.job_done("co", 600)
            if q.exported_node() != "m":
                raise Failure(f"after the active commit's pivot the export is on {q.exported_node()}")

        for name, f in (("snapshot", snap1), ("stream", stream), ("mirror+pivot", mirror),
                        ("snapshot+active commit+pivot", commit)):
            step(name, f)
        r1 = wait_guest(console, qemu, guest_round(console)[0] + 2, 300)
        log(f"jobs took {time.time() - t_jobs:.0f}s; the guest went from round {r0} to {r1}")
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(ctl)
            c.sendall(b"stop\n")
            try:
                qemu.wait(a.timeout)
            except subprocess.TimeoutExpired:
                raise Failure("the guest did not finish after 'stop'")
        _, txt = guest_round(console)
        res = re.findall(r"SLUICE-VM-RESULT: (.*)", txt)
        sums = re.findall(r"SLUICE-VM-DISK-SHA256: ([0-9a-f]{64})", txt)
        print("SLUICE-VM-RESULT: " + (res[-1].strip() if res else "FAIL no result line"), flush=True)
        if not res or not res[-1].startswith("PASS") or not sums:
            raise Failure("the guest failed:\n" + txt[-4000:])
        # The final image: the export's node closed (flushed) first.
        q.cmd("block-export-del", id="disk", mode="hard")
        time.sleep(0.5)
        # Close what can be closed (the committed overlay may stay a node of
        # its own); the guest's final flushes made the image consistent
        # either way, and -U reads it while sluice may still hold it open.
        for n in ("n2", "m"):
            r = q.q.cmd_raw("blockdev-del", {"node-name": n})
            log(f"blockdev-del {n}: {r}")
        out = qemu_img("check", "-U", img("m.qcow2"))
        info = qemu_img("info", "-U", img("m.qcow2"))
        if "backing file" in info:
            raise Failure(f"the final image has a backing file:\n{info}")
        raw = img("final.raw")
        qemu_img("convert", "-U", "-O", "raw", img("m.qcow2"), raw)
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        os.unlink(raw)
        if h.hexdigest() != sums[-1]:
            raise Failure(f"the final image's contents ({h.hexdigest()}) differ from the guest's disk ({sums[-1]})")
        print(f"SLUICE-VM-HOST: PASS ({a.mode}) {'; '.join(steps)}; qemu-img check clean "
              f"({out.strip().splitlines()[-1] if out.strip() else 'no errors'}); final image = the guest's disk "
              f"(sha256); VM ran {time.time() - t_boot:.0f}s under TCG", flush=True)
        ok = True
    except Failure as e:
        print(f"SLUICE-VM-HOST: FAIL ({a.mode}) {e}", flush=True)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

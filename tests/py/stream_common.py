"""Helpers for the streaming tests: a synchronous QMP session on qemu.qmp's
legacy client with iotests-style helpers, and qemu-img / qemu-io wrappers."""

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import time

from qemu.qmp.legacy import QEMUMonitorProtocol


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpc", required=True)
    ap.add_argument("--qmp", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--case", required=True)
    return ap.parse_args()


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if not (r.returncode == 0):
        raise AssertionError(f"qemu-img {args}: {r.stdout}{r.stderr}")
    return r.stdout


def qemu_img_rc(*args):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def qemu_io(*args):
    r = subprocess.run(["qemu-io", *map(str, args)], capture_output=True, text=True)
    if not (r.returncode == 0 and "verification failed" not in r.stdout):
        raise AssertionError(f"qemu-io {args}: {r.stdout}{r.stderr}")
    return r.stdout


def info(path):
    return json.loads(qemu_img("info", "--output=json", "-U", path))


def qmap(path):
    return json.loads(qemu_img("map", "--output=json", "-U", path))


def depth_at(path, off):
    """The chain depth (0 = the image itself) the byte at `off` comes from."""
    for e in qmap(path):
        if e["start"] <= off < e["start"] + e["length"]:
            return e["depth"]
    raise AssertionError(f"{off} outside {path}")


def check(path):
    r = qemu_img_rc("check", "-U", path)
    if not (r.returncode == 0):
        raise AssertionError(f"qemu-img check {path}: {r.stdout}{r.stderr}")


def compare_raw(img, raw):
    r = qemu_img_rc("compare", "-U", "-F", "raw", img, raw)
    if not (r.returncode == 0):
        raise AssertionError(f"qemu-img compare {img} {raw}: {r.stdout}{r.stderr}")


def make_chain(d, names, size, writes, fmt="qcow2"):
    """Creates images names[0] (bottom) .. names[-1] (top) in d; writes[i] is a
    list of qemu-io commands for image i. Returns the paths."""
    paths = [os.path.join(d, f"{n}.qcow2") for n in names]
    for i, p in enumerate(paths):
        if i == 0:
            qemu_img("create", "-q", "-f", fmt, p, size)
        else:
            qemu_img("create", "-q", "-f", fmt, "-b", paths[i - 1], "-F", fmt, p, size)
        cmds = []
        for w in writes[i] if i < len(writes) else []:
            cmds += ["-c", w]
        if cmds:
            qemu_io("-f", fmt, *cmds, p)
    return paths


def reference(d, top, name="ref.raw"):
    """The guest-visible content of an image, as a raw file."""
    out = os.path.join(d, name)
    qemu_img("convert", "-U", "-O", "raw", top, out)
    return out


class Vm:
    """A QMP session with iotests' helpers."""

    def __init__(self, path):
        self.q = QEMUMonitorProtocol(path)
        self.q.connect(negotiate=True)
        self.pending = []

    @staticmethod
    def _args(kw):
        return {k.replace("_", "-"): v for k, v in kw.items()}

    def qmp(self, cmd, **kw):
        """Like iotests' vm.qmp: keyword underscores become dashes."""
        return self.q.cmd_raw(cmd, self._args(kw))

    def raw(self, cmd, args=None):
        return self.q.cmd_raw(cmd, args or {})

    def cmd(self, cmd, **kw):
        r = self.qmp(cmd, **kw)
        if not ("return" in r):
            raise AssertionError(f"{cmd} {kw}: {r}")
        return r["return"]

    def rcmd(self, cmd, args=None):
        r = self.raw(cmd, args)
        if not ("return" in r):
            raise AssertionError(f"{cmd} {args}: {r}")
        return r["return"]

    def event_wait(self, name, timeout=60.0, match=None):
        deadline = time.time() + timeout
        while True:
            for i, ev in enumerate(self.pending):
                if ev["event"] == name and (match is None or all(ev["data"].get(k) == v for k, v in match.items())):
                    return self.pending.pop(i)
            left = deadline - time.time()
            if not (left > 0):
                raise AssertionError(f"no {name} {match} within {timeout}s; got {[e['event'] for e in self.pending]}")
            try:
                ev = self.q.pull_event(wait=min(left, 1.0))
            except (TimeoutError, asyncio.TimeoutError):
                ev = None
            if ev is not None:
                self.pending.append(ev)

    def events(self, name):
        """Drains what has arrived and returns (and forgets) the events called `name`."""
        while True:
            ev = self.q.pull_event(wait=False)
            if ev is None:
                break
            self.pending.append(ev)
        got = [e for e in self.pending if e["event"] == name]
        self.pending = [e for e in self.pending if e["event"] != name]
        return got

    def statuses(self, jid, timeout=30.0):
        """Waits for the job to reach null; returns its JOB_STATUS_CHANGE statuses in order."""
        self.event_wait("JOB_STATUS_CHANGE", timeout, {"id": jid, "status": "null"})
        got = [e["data"]["status"] for e in self.pending if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == jid]
        self.pending = [e for e in self.pending if not (e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == jid)]
        return got + ["null"]

    def wait_until_completed(self, drive="drive0", timeout=120.0, error=None):
        ev = self.event_wait("BLOCK_JOB_COMPLETED", timeout, {"device": drive})
        d = ev["data"]
        if not (d["type"] == "stream"):
            raise AssertionError(d)
        if error is None:
            if not ("error" not in d):
                raise AssertionError(d)
            if not (d["offset"] == d["len"]):
                raise AssertionError(d)
        else:
            if not (d.get("error") == error):
                raise AssertionError(d)
        return d

    def jobs(self):
        return self.cmd("query-block-jobs")

    def assert_no_active_block_jobs(self):
        if not (self.jobs() == []):
            raise AssertionError(self.jobs())

    def job(self, jid):
        for j in self.jobs():
            if j["device"] == jid:
                return j
        raise AssertionError(f"job {jid} not found in {self.jobs()}")

    def pause_wait(self, jid, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(jid)
            if j["paused"] and not j["busy"]:
                return j
            time.sleep(0.02)
        raise AssertionError(f"job {jid} did not pause: {self.job(jid)}")

    def open(self, **kw):
        """bdev_qcow2_open (its parameters are SPDK-style, with underscores)."""
        return self.rcmd("bdev_qcow2_open", kw)

    def open_nodes(self, paths, names, device=None):
        """Opens each image as a node bound to the one below it; the top also as `device`."""
        for i, (p, n) in enumerate(zip(paths, names)):
            a = {"node_name": n, "filename": p}
            if i == 0:
                a["no_backing"] = True
            else:
                a["backing"] = names[i - 1]
            if device and i == len(paths) - 1:
                a["name"] = device
            self.open(**a)

    def close(self, name):
        """Flushes and closes a device or node (and what below it nothing else uses)."""
        self.rcmd("bdev_qcow2_delete", {"name": name})


@contextlib.contextmanager
def qsd_monitor(d):
    """A fresh qemu-storage-daemon with a QMP monitor in `d`, as a Vm; stopped
    on leaving (for scripts that compare sluice's answers with QSD's)."""
    sock = os.path.join(d, "qsd.sock")
    p = subprocess.Popen(["qemu-storage-daemon", "--chardev",
                          f"socket,path={sock},server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while not os.path.exists(sock):
            if not (p.poll() is None and time.time() < deadline):
                raise AssertionError(p.stderr.read())
            time.sleep(0.02)
        # The socket exists a moment before QSD's monitor answers on it: a
        # connection then may fail its negotiation. Try again.
        for attempt in range(50):
            try:
                qsd = Vm(sock)
                break
            except Exception:
                if attempt == 49 or p.poll() is not None:
                    raise
                time.sleep(0.05)
        try:
            yield qsd
        finally:
            qsd.q.close()
    finally:
        p.terminate()
        p.wait(10)


def run_case(cases):
    """A test script's main: runs `case_<--case>(vm, dir)` from `cases` (the
    script's globals) on a QMP session to `--qmp`, then prints "ok"."""
    a = parse_args()
    vm = Vm(a.qmp)
    cases["case_" + a.case](vm, a.dir)
    print("ok")

"""Image locks over QMP, compared with qemu-storage-daemon 10 answering the
same commands: a snapshot onto the node's own image, `blockdev-create` of a
file an image node has open, a second writer and a reader of that file; the
image is intact afterwards (qemu-img check, qemu-io pattern reads)."""

import os
import subprocess
import time

from stream_common import run_case, qsd_monitor, make_chain

MiB = 1 << 20


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def run(*cmd):
    """Runs a QEMU tool, bounded in time (`qemu-img check` of an image made
    its own backing file never ends); raises unless it succeeds."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or "verification failed" in r.stdout:
        raise Mismatch(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")


def answers(vm, d, script):
    """Runs (command, arguments) pairs; ("job", id) waits for the job to
    conclude and records its error, then dismisses it. Errors are reduced to
    QEMU's message before sluice's hint, the directory replaced by D."""
    out = []
    for cmd, args in script:
        if cmd == "job":
            vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": args, "status": "concluded"})
            jobs = [j for j in vm.rcmd("query-jobs") if j["id"] == args]
            out.append(("job", jobs[0].get("error")))
            vm.rcmd("job-dismiss", {"id": args})
            continue
        r = vm.raw(cmd, args)
        if "error" in r:
            desc = r["error"]["desc"].split(". Is another process")[0]
            out.append((cmd, "error", r["error"]["class"], desc.replace(d, "D")))
        else:
            out.append((cmd, "ok"))
    return out


def script(d):
    top = os.path.join(d, "top.qcow2")
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-snapshot-sync", {"node-name": "top", "snapshot-file": top,
                                    "snapshot-node-name": "s0", "format": "qcow2"}),
        ("blockdev-create", {"job-id": "c1", "options": {"driver": "file", "filename": top,
                                                         "size": 0}}),
        ("job", "c1"),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top2",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top3", "read-only": True,
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-del", {"node-name": "top"}),
        # Closed: the file is free again.
        ("blockdev-add", {"driver": "qcow2", "node-name": "top4",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-del", {"node-name": "top4"}),
    ]


def case_locks_qsd(vm, d):
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        os.mkdir(sub)
        make_chain(sub, ["base", "top"], "8M", [["write -P 0x11 0 1M"], ["write -P 0x22 1M 1M"]])
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = answers(qsd, sub, script(sub))
        else:
            runs[who] = answers(vm, sub, script(sub))
        top = os.path.join(sub, "top.qcow2")
        run("qemu-img", "check", top)
        run("qemu-io", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", top)
    for g, w in zip(runs["sluice"], runs["qsd"]):
        expect(g == w, f"\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), f"{runs}")
    refused = [a for a in runs["sluice"] if "error" in a or a[0] == "job"]
    expect(len(refused) == 4, f"expected 4 refusals: {runs['sluice']}")


def held_bytes(path):
    """The lock bytes held on `path` by anyone (/proc/locks, OFD locks)."""
    ino = os.stat(path).st_ino
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and any(x.endswith(f":{ino}") for x in fields):
                out += range(int(fields[-2]), int(fields[-1]) + 1)
    return sorted(out)


def held(path):
    """The distinct lock bytes held on `path`. QEMU reopens an image by
    opening a second descriptor before closing the first, so for a moment
    the same byte can be held twice; which bytes are held is what counts."""
    return sorted(set(held_bytes(path)))


def tools(path):
    """What QEMU's tools make of `path` now: (tool, success)."""
    out = []
    for cmd in (["qemu-img", "info", path],
                ["qemu-io", "-r", "-c", "read -P 0x22 1M 1M", path],
                ["qemu-io", "-c", "read 0 512", path]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        out.append((" ".join(cmd[:2]), r.returncode == 0))
    return out


def snapshot_script(vm, d):
    """After a snapshot the old top is a backing file: QEMU's tools read it
    and another device reads through it; `force-share` needs read-only and
    then holds no "not shared" byte. Returns what was seen, D for the dir."""
    top, base = os.path.join(d, "top.qcow2"), os.path.join(d, "base.qcow2")
    seen = []

    def add(args):
        r = vm.raw("blockdev-add", args)
        if "error" in r:
            seen.append(("blockdev-add", args["node-name"], r["error"]["class"],
                         r["error"]["desc"].split(". Is another process")[0].replace(d, "D")))
        else:
            seen.append(("blockdev-add", args["node-name"], "ok"))

    add({"driver": "qcow2", "node-name": "top",
         "file": {"driver": "file", "filename": top}})
    seen.append(("before", held(top), held(base), tools(top)))
    r = vm.raw("blockdev-snapshot-sync", {"node-name": "top", "format": "qcow2",
                                          "snapshot-file": os.path.join(d, "s1.qcow2"),
                                          "snapshot-node-name": "s1"})
    expect("return" in r, f"snapshot: {r}")
    seen.append(("after", held(top), held(base), tools(top)))
    # Another device over the old top: a new overlay whose backing file it
    # is (qemu-img create opens it), a read-only image of it; a writer not.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2",
        os.path.join(d, "o2.qcow2"))
    add({"driver": "qcow2", "node-name": "dev2",
         "file": {"driver": "file", "filename": os.path.join(d, "o2.qcow2")}})
    add({"driver": "qcow2", "node-name": "ro2", "read-only": True,
         "file": {"driver": "file", "filename": top}})
    add({"driver": "qcow2", "node-name": "rw2",
         "file": {"driver": "file", "filename": top}})
    seen.append(("second users", held(top)))
    for n in ("dev2", "ro2"):
        r = vm.raw("blockdev-del", {"node-name": n})
        expect("return" in r, f"blockdev-del {n}: {r} after {seen}")
        seen.append(("deleted", n, held(top)))
    # force-share: refused without read-only (at the top or nested), and
    # with it no "not shared" byte, on the image and its backing file (a
    # nested file's force-share: on the image file only).
    add({"driver": "qcow2", "node-name": "fs0", "force-share": True,
         "file": {"driver": "file", "filename": top}})
    add({"driver": "qcow2", "node-name": "fs1",
         "file": {"driver": "file", "force-share": True, "filename": top}})
    add({"driver": "file", "node-name": "fs2", "force-share": True, "filename": top})
    o2 = os.path.join(d, "o2.qcow2")
    add({"driver": "qcow2", "node-name": "fs3", "read-only": True, "force-share": True,
         "file": {"driver": "file", "filename": o2}})
    seen.append(("force-share", held(o2), held(top)))
    expect("return" in vm.raw("blockdev-del", {"node-name": "fs3"}), "blockdev-del fs3")
    add({"driver": "qcow2", "node-name": "fs4", "read-only": True,
         "file": {"driver": "file", "force-share": True, "filename": o2}})
    seen.append(("nested force-share", held(o2), held(top)))
    # A writer of o2 coexists with a force-share reader, not with a reader.
    add({"driver": "qcow2", "node-name": "w3",
         "file": {"driver": "file", "filename": o2}})
    expect("return" in vm.raw("blockdev-del", {"node-name": "fs4"}), "blockdev-del fs4")
    return seen


def case_snapshot_qsd(vm, d):
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        os.mkdir(sub)
        make_chain(sub, ["base", "top"], "8M", [["write -P 0x11 0 1M"], ["write -P 0x22 1M 1M"]])
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = snapshot_script(qsd, sub)
        else:
            runs[who] = snapshot_script(vm, sub)
    for g, w in zip(runs["sluice"], runs["qsd"]):
        expect(g == w, f"\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), f"{runs}")
    after = [s for s in runs["sluice"] if s[0] == "after"][0]
    expect(after[1] == [100, 201, 203], f"old top after the snapshot: {after}")


class Holder:
    """`qemu-io -r` holding `path` (a reader's lock) until stopped."""

    def __init__(self, path):
        before = len(held_bytes(path))
        self.p = subprocess.Popen(["qemu-io", "-r", "-c", "sleep 60000", path],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 10
        while len(held_bytes(path)) <= before:
            if self.p.poll() is not None or time.time() > deadline:
                raise Mismatch(f"qemu-io -r did not take {path}: {self.p.stderr.read()}")
            time.sleep(0.02)

    def stop(self):
        self.p.terminate()
        self.p.wait(10)


def backing_writes_script(vm, d):
    """Writes into a backing file (a stream into it, a new backing file name
    in its header) take a writer's lock for the moment, as QEMU reopens the
    node read-write: refused while another process reads the file, done
    without one, and the reader's lock is back afterwards."""
    top, base = os.path.join(d, "top.qcow2"), os.path.join(d, "base.qcow2")
    s1, s2 = os.path.join(d, "s1.qcow2"), os.path.join(d, "s2.qcow2")
    seen = []

    def do(cmd, args):
        r = vm.raw(cmd, args)
        if "error" in r:
            seen.append((cmd, r["error"]["class"],
                         r["error"]["desc"].split(". Is another process")[0].replace(d, "D")))
        else:
            seen.append((cmd, "ok"))
        return r

    vm.rcmd("nbd-server-start", {"addr": {"type": "unix",
                                          "data": {"path": os.path.join(d, "nbd.sock")}}})
    do("blockdev-add", {"driver": "qcow2", "node-name": "top",
                        "file": {"driver": "file", "filename": top}})
    do("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True})
    for old, new in (("top", "s1"), ("s1", "s2")):
        do("blockdev-snapshot-sync", {"node-name": old, "format": "qcow2",
                                      "snapshot-file": os.path.join(d, f"{new}.qcow2"),
                                      "snapshot-node-name": new})
    seen.append(("snapshots", held(top), held(s1), held(s2)))
    h = Holder(s1)
    do("block-stream", {"job-id": "j1", "device": "s1", "base": base})
    do("change-backing-file", {"device": "s2", "image-node-name": "s1",
                               "backing-file": top})
    h.stop()
    seen.append(("held", held(s1)))
    if "return" in do("block-stream", {"job-id": "j1", "device": "s1", "base": base}):
        vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": "j1", "status": "null"})
    seen.append(("streamed", held(s1)))
    do("change-backing-file", {"device": "s2", "image-node-name": "s1",
                               "backing-file": "base.qcow2"})
    seen.append(("changed", held(s1), held(s2)))
    do("block-export-del", {"id": "e0"})
    vm.rcmd("nbd-server-stop")
    return seen


def case_backing_writes_qsd(vm, d):
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        os.mkdir(sub)
        make_chain(sub, ["base", "top"], "8M", [["write -P 0x11 0 1M"], ["write -P 0x22 1M 1M"]])
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = backing_writes_script(qsd, sub)
        else:
            runs[who] = backing_writes_script(vm, sub)
        s1 = os.path.join(sub, "s1.qcow2")
        run("qemu-img", "check", s1)
        # sluice keeps the overlay node s2 open (QSD closed it with the export).
        run("qemu-io", "-r", "-U", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
            os.path.join(sub, "s2.qcow2"))
        info = subprocess.run(["qemu-img", "info", "--output=json", s1],
                              capture_output=True, text=True, check=True).stdout
        expect('"backing-filename": "base.qcow2"' in info, f"{who}: {info}")
    for g, w in zip(runs["sluice"], runs["qsd"]):
        expect(g == w, f"\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), f"{runs}")


run_case(globals())

"""block-commit, compared step by step with qemu-storage-daemon 10 doing the
same thing: replies, refusals (class and message), events in order
(JOB_STATUS_CHANGE, BLOCK_JOB_*), the graph afterwards; images judged by
qemu-img compare / check; a commit under verified NBD client I/O."""

import os
import subprocess
import time

import qmp_script

from stream_common import (check, compare_raw, make_chain, qemu_img, qemu_io, qsd_monitor, reference,
                           run_case)

MiB = 1 << 20
KiB = 1 << 10


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def file(p):
    return {"driver": "file", "filename": p}


def chain4(d):
    """base <- m1 <- m2 <- top (4 MiB), each layer writing its own pattern
    over part of the one below; returns the paths."""
    return make_chain(d, ["base", "m1", "m2", "top"], "4M", [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 512k 1M", "write -z 3M 256k"],
        ["write -P 0x33 1M 1M"],
        ["write -P 0x44 1536k 512k"],
    ])


def add_chain(d):
    """Every layer as its own monitor-owned node, each backed by the one below."""
    names = ["base", "m1", "m2", "top"]
    out = []
    for i, n in enumerate(names):
        a = {"driver": "qcow2", "node-name": n, "file": file(os.path.join(d, f"{n}.qcow2")),
             "backing": names[i - 1] if i else None}
        out.append(("blockdev-add", a))
    return out


def script(d):
    """(command, arguments); ("wait", id) waits for the job to reach null and
    records the events since, in order. Each step must end the same on both."""
    s = add_chain(d)
    c = lambda **kw: ("block-commit", {"device": "top", **kw})  # noqa: E731
    s += [
        ("block-commit", {"device": "nosuch"}),
        ("block-commit", {}),
        c(bogus=1),
        c(**{"top-node": "nosuch"}),
        c(**{"base-node": "nosuch"}),
        c(**{"top-node": "m2", "base-node": "m2"}),
        c(**{"top-node": "base", "base-node": "m1"}),
        c(**{"top-node": "m1", "base-node": "m2"}),
        c(**{"top-node": "m2", "top": "x"}),
        c(**{"base-node": "base", "base": "x"}),
        c(top="nosuch.qcow2"),
        c(base="nosuch.qcow2"),
        c(**{"top-node": "m2", "on-error": "bogus"}),
        c(**{"top-node": "m2", "job-id": "1x"}),
        c(**{"top-node": "m2"}),
        c(**{"top-node": "top", "base-node": "m1", "backing-file": "x"}),
        ("block-commit", {"device": "m2", "top-node": "m1"}),
        ("block-commit", {"device": "base"}),
        # A slow job, refusals while it runs, then a cancel: nothing changes.
        c(**{"job-id": "j1", "top-node": "m2", "base-node": "m1", "speed": 1,
             "filter-node-name": "flt"}),
        ("query-block-jobs", {}),
        c(**{"job-id": "j2", "top-node": "m2"}),
        ("block-stream", {"device": "top", "job-id": "j3"}),
        ("block-job-complete", {"device": "j1"}),
        ("block-job-cancel", {"device": "j1"}),
        ("wait", "j1"),
        ("query-named-block-nodes", {}),
        # m2 into m1, finalized and dismissed by hand.
        c(**{"job-id": "j4", "top-node": "m2", "base-node": "m1", "auto-finalize": False,
             "auto-dismiss": False}),
        ("wait-status", ("j4", "pending")),
        ("query-jobs", {}),
        ("job-dismiss", {"id": "j4"}),
        ("job-finalize", {"id": "j4"}),
        ("wait-status", ("j4", "concluded")),
        ("job-dismiss", {"id": "j4"}),
        ("wait", "j4"),
        ("query-named-block-nodes", {}),
        ("query-block-jobs", {}),
        # m1 by file name into the bottom (the default base), with a relative
        # backing-file string.
        c(**{"job-id": "j5", "top": os.path.join(d, "m1.qcow2"), "backing-file": "base.qcow2",
             "on-error": "stop"}),
        ("wait", "j5"),
        ("query-named-block-nodes", {}),
        ("query-jobs", {}),
    ]
    return s


MINE = {"base", "m1", "m2", "top"}


def answer(cmd, r):
    if "error" in r:
        return ("error", r["error"]["class"], r["error"]["desc"])
    v = r["return"]
    if cmd == "query-named-block-nodes":
        return sorted((n["node-name"], n["backing_file_depth"], n["image"].get("backing-filename"))
                      for n in v if n["node-name"] in MINE)
    if cmd == "query-block-jobs":
        # offset and busy depend on timing.
        return [{k: x for k, x in j.items() if k not in ("offset", "busy")} for j in v]
    if cmd == "query-jobs":
        return [{k: x for k, x in j.items() if k != "current-progress"} for j in v]
    return ("ok", v)


def event_view(ev):
    data = dict(ev["data"])
    if ev["event"] == "BLOCK_JOB_CANCELLED":
        data.pop("offset", None)
    return (ev["event"], data)


def run_script(vm, d, s):
    return qmp_script.run_script(vm, d, s, answer, event_view)


def make(sub):
    os.mkdir(sub)
    paths = chain4(sub)
    return paths, reference(sub, paths[-1])


def case_qsd(vm, d):
    """The whole conversation on QSD and on sluice, step by step."""
    runs, images = {}, {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        paths, ref = make(sub)
        s = script(sub)
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = run_script(qsd, sub, s)
        else:
            runs[who] = run_script(vm, sub, s)
            for n in ("top", "m2", "m1", "base"):
                expect("return" in vm.raw("blockdev-del", {"node-name": n}), f"blockdev-del {n}")
        images[who] = (paths, ref)
    for i, (g, w) in enumerate(zip(runs["sluice"], runs["qsd"])):
        expect(g == w, f"step {i}:\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), "lengths differ")
    errors = sum(1 for g in runs["sluice"] if isinstance(g[2], tuple) and g[2][0] == "error")
    expect(errors >= 20, f"only {errors} refusals")
    # The data: top shows what it showed before; every image is consistent;
    # top now sits right on base, which holds what m1 and m2 held.
    for who, (paths, ref) in images.items():
        base, m1, m2, top = paths
        for p in paths:
            check(p)
        compare_raw(top, ref)
        info = qemu_img("info", "-U", top)
        expect("backing file: base.qcow2" in info, f"{who}: top's backing: {info}")
        qemu_io("-f", "qcow2", "-r", "-U", "-c", "read -P 0x33 1M 512k", "-c", "read -P 0x22 512k 512k",
                "-c", "read -P 0 3M 256k", "-c", "read -P 0x11 2M 1M", base)
    # Both made the same base, byte for byte as the guest sees it.
    r = subprocess.run(["qemu-img", "compare", "-U", images["qsd"][0][0], images["sluice"][0][0]],
                       capture_output=True, text=True)
    expect(r.returncode == 0, f"bases differ: {r.stdout}{r.stderr}")


def active_script(d):
    """An active commit to its pivot; another cancelled once ready; refusals
    while one runs."""
    s = add_chain(d)
    s += [
        ("block-commit", {"device": "top", "job-id": "a1", "base-node": "m1"}),
        ("wait-status", ("a1", "ready")),
        ("query-block-jobs", {}),
        ("block-commit", {"device": "top", "job-id": "a2"}),
        ("block-job-complete", {"device": "a1"}),
        ("wait", "a1"),
        ("query-named-block-nodes", {}),
        ("block-commit", {"device": "top", "job-id": "a3", "top-node": "top",
                          "auto-finalize": False}),
        ("wait-status", ("a3", "ready")),
        ("block-job-cancel", {"device": "a3", "force": True}),
        ("wait", "a3"),
        ("query-named-block-nodes", {}),
        # A cancel without force once ready completes without the pivot.
        ("block-commit", {"device": "top", "job-id": "a4", "auto-dismiss": False}),
        ("wait-status", ("a4", "ready")),
        ("block-job-cancel", {"device": "a4"}),
        ("wait-status", ("a4", "concluded")),
        ("query-jobs", {}),
        ("job-dismiss", {"id": "a4"}),
        ("wait", "a4"),
        ("query-named-block-nodes", {}),
        ("query-jobs", {}),
    ]
    return s


def case_active_qsd(vm, d):
    """The active commit's conversation on QSD and on sluice, step by step:
    ready, complete (the pivot), a forced cancel once ready; data judged."""
    runs, images = {}, {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        paths, ref = make(sub)
        s = active_script(sub)
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = run_script(qsd, sub, s)
        else:
            runs[who] = run_script(vm, sub, s)
            for n in ("top", "m2", "m1", "base"):
                expect("return" in vm.raw("blockdev-del", {"node-name": n}), f"blockdev-del {n}")
        images[who] = (paths, ref)
    for i, (g, w) in enumerate(zip(runs["sluice"], runs["qsd"])):
        expect(g == w, f"step {i}:\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), "lengths differ")
    for who, (paths, ref) in images.items():
        base, m1, m2, top = paths
        for p in paths:
            check(p)
        # m1 now holds what the device showed; top and m2 are as they were.
        compare_raw(m1, ref)
        compare_raw(top, ref)
    r = subprocess.run(["qemu-img", "compare", "-U", images["qsd"][0][1], images["sluice"][0][1]],
                       capture_output=True, text=True)
    expect(r.returncode == 0, f"m1 differs: {r.stdout}{r.stderr}")


def client(u, n):
    """One NBD connection writing n 8 KiB blocks (20 ms apart, so it spans
    the commit), then reading every one back and what the layers showed."""
    cmds = []
    for i in range(n):
        cmds += ["-c", f"write -P 0x55 {2 * MiB + i * 8 * KiB} 8k", "-c", "sleep 20"]
    cmds += ["-c", f"read -P 0x55 {2 * MiB} {n * 8}k", "-c", "read -P 0x33 1M 512k",
             "-c", "read -P 0x22 512k 512k"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, u],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def case_nbd_io(vm, d):
    """top exported over NBD; a client writes and verifies through it while m2
    and m1 are committed into base; the image shows the client's writes on
    the committed data."""
    sub = os.path.join(d, "n")
    paths, ref = make(sub)
    for cmd, args in add_chain(sub):
        vm.rcmd(cmd, args)
    sock = os.path.join(sub, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True})
    n = 200
    p = client(f"nbd+unix:///top?socket={sock}", n)
    # A slow commit (about 2 s), so the client's I/O (about 4 s) spans it.
    vm.rcmd("block-commit", {"device": "top", "job-id": "c0", "top-node": "m2", "speed": MiB})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "c0", "status": "null"})
    done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0]["data"], f"c0: {done}")
    expect(p.poll() is None, "the client finished before the commit did: nothing overlapped")
    out, errs = p.communicate(timeout=60)
    expect(p.returncode == 0 and "fail" not in out and "error" not in (out + errs).lower(), out + errs)
    expect(out.count("wrote 8192/8192") == n and out.count("read ") == 3, out)
    qemu_io("-f", "raw", "-c", f"write -P 0x55 {2 * MiB} {n * 8}k", ref)
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
    for nd in ("top", "m2", "m1", "base"):
        vm.rcmd("blockdev-del", {"node-name": nd})
    for path in paths:
        check(path)
    compare_raw(paths[-1], ref)
    expect("backing file: " + paths[0] in qemu_img("info", "-U", paths[-1]), "top not on base")


def case_active_nbd(vm, d):
    """top exported over NBD; a client writes and verifies through it while
    top, m2 and m1 are committed into base, across the pivot at
    block-job-complete; the export ends on base, which shows every write."""
    sub = os.path.join(d, "n")
    paths, ref = make(sub)
    for cmd, args in add_chain(sub):
        vm.rcmd(cmd, args)
    sock = os.path.join(sub, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True})
    n = 200
    p = client(f"nbd+unix:///top?socket={sock}", n)
    vm.rcmd("block-commit", {"device": "top", "job-id": "a0", "speed": MiB})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "a0"})
    # Writes go on while ready: they are mirrored into base too.
    time.sleep(0.3)
    expect(vm.rcmd("query-block-jobs")[0]["ready"], "not ready")
    expect(p.poll() is None, "the client finished before the pivot: nothing overlapped")
    vm.rcmd("block-job-complete", {"device": "a0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "a0", "status": "null"})
    done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0]["data"], f"a0: {done}")
    ex = vm.rcmd("query-block-exports")
    expect([e["node-name"] for e in ex] == ["base"], f"export not moved onto base: {ex}")
    out, errs = p.communicate(timeout=60)
    expect(p.returncode == 0 and "fail" not in out and "error" not in (out + errs).lower(), out + errs)
    expect(out.count("wrote 8192/8192") == n and out.count("read ") == 3, out)
    qemu_io("-f", "raw", "-c", f"write -P 0x55 {2 * MiB} {n * 8}k", ref)
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
    for nd in ("top", "m2", "m1", "base"):
        vm.rcmd("blockdev-del", {"node-name": nd})
    for path in paths:
        check(path)
    compare_raw(paths[0], ref)


def case_device(vm, d):
    """A named device over nodes opened one by one (bdev_qcow2_open): an
    intermediate commit, then an active one; the device ends on base, the
    released layers are closed, and writes through the device land in base.
    A chain opened from the headers has read-only backing nodes: base is
    reopened read-write for the job and read-only after it, as QEMU does."""
    sub = os.path.join(d, "ro")
    paths, ref = make(sub)
    vm.open(name="drive1", node_name="rtop", filename=paths[-1])
    base = "rtop.backing.backing.backing"
    ro = {n["node-name"]: n["ro"] for n in vm.rcmd("query-named-block-nodes")}
    expect(ro.get(base) is True, f"{base} not read-only: {ro}")
    vm.rcmd("block-commit", {"device": "drive1", "top-node": "rtop.backing"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "drive1", "status": "null"})
    done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0]["data"], f"{done}")
    vm.pending = []
    ro = {n["node-name"]: n["ro"] for n in vm.rcmd("query-named-block-nodes")}
    expect(ro.get(base) is True, f"{base} not read-only again: {ro}")
    vm.close("drive1")
    for path in paths:
        check(path)
    compare_raw(paths[-1], ref)
    sub = os.path.join(d, "dev")
    paths, ref = make(sub)
    vm.open_nodes(paths, ["base", "m1", "m2", "top"], device="drive0")
    names = {p: n for p, n in zip(paths, ["base", "m1", "m2", "top"])}
    vm.rcmd("block-commit", {"device": "drive0", "top-node": names[paths[2]]})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "drive0", "status": "null"})
    ins = vm.rcmd("query-block")[0]["inserted"]
    # m2 and m1 into base (the default): both released.
    expect(ins["backing_file_depth"] == 1, ins)
    files = sorted(n["file"] for n in vm.rcmd("query-named-block-nodes"))
    expect(files == sorted([paths[0], paths[-1]]), f"m2, m1 not released: {files}")
    vm.rcmd("block-commit", {"device": "drive0"})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "drive0"})
    vm.rcmd("block-job-complete", {"device": "drive0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "drive0", "status": "null"})
    done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 2 and all("error" not in e["data"] for e in done), f"{done}")
    ins = vm.rcmd("query-block")[0]["inserted"]
    expect(ins["backing_file_depth"] == 0 and ins["file"] == paths[0], ins)
    files = sorted(n["file"] for n in vm.rcmd("query-named-block-nodes"))
    expect(files == [paths[0]], f"layers not released: {files}")
    sock = os.path.join(sub, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "drive0", "writable": True})
    for img in (f"nbd+unix:///drive0?socket={sock}", ref):
        qemu_io("-f", "raw", "-c", "write -P 0x66 3M 64k", img)
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
    vm.close("drive0")
    for path in paths:
        check(path)
    compare_raw(paths[0], ref)
    # The intermediate commit pointed top at base; the active one left top as it was.
    expect("backing file: " + paths[0] in qemu_img("info", "-U", paths[-1]), "top not on base")


def case_active_new_export(vm, d):
    """An export added on top while an active commit runs had its writes
    untracked: block-job-complete ends the job with an error instead of a
    pivot that would lose them; the chain and the export stay usable."""
    sub = os.path.join(d, "x")
    paths, ref = make(sub)
    for cmd, args in add_chain(sub):
        vm.rcmd(cmd, args)
    vm.rcmd("block-commit", {"device": "top", "job-id": "x0"})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "x0"})
    sock = os.path.join(sub, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True})
    u = f"nbd+unix:///top?socket={sock}"
    for img in (u, ref):
        qemu_io("-f", "raw", "-c", "write -P 0x77 2M 64k", img)
    vm.rcmd("block-job-complete", {"device": "x0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "x0", "status": "null"})
    done = [e["data"] for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "new user" in done[0].get("error", ""), f"x0: {done}")
    ex = vm.rcmd("query-block-exports")
    expect([e["node-name"] for e in ex] == ["top"], f"export moved: {ex}")
    qemu_io("-f", "raw", "-c", "read -P 0x77 2M 64k", "-c", "write -P 0x78 3M 64k", u)
    qemu_io("-f", "raw", "-c", "write -P 0x78 3M 64k", ref)
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
    for nd in ("top", "m2", "m1", "base"):
        vm.rcmd("blockdev-del", {"node-name": nd})
    for path in paths:
        check(path)
    compare_raw(paths[-1], ref)
    expect("backing file: " + paths[2] in qemu_img("info", "-U", paths[-1]), "top's backing changed")


run_case(globals())

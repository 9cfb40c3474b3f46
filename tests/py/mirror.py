"""blockdev-mirror (and drive-mirror, block-job-change), compared step by
step with qemu-storage-daemon 10 doing the same thing: replies, refusals
(class and message), events in order (JOB_STATUS_CHANGE, BLOCK_JOB_READY,
BLOCK_JOB_*); targets judged by qemu-img compare / check; a mirror under
verified NBD client I/O across the pivot; write-blocking converging under a
write load a background mirror does not keep up with."""

import os
import random
import subprocess
import time

import qmp_script
from qmp_script import seen

from stream_common import check, compare_raw, info, make_chain, qemu_img, qemu_io, qsd_monitor, reference, run_case

MiB = 1 << 20
KiB = 1 << 10


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def file(p):
    return {"driver": "file", "filename": p}


def chain3(d, size="4M"):
    """base <- mid <- top, each layer writing its own pattern over part of
    the one below (sparse: 3M..end is unallocated); returns the paths."""
    return make_chain(d, ["base", "mid", "top"], size, [
        ["write -P 0x11 0 1M"],
        ["write -P 0x22 512k 1M", "write -z 1536k 256k"],
        ["write -P 0x33 1M 512k", "write -P 0x44 2M 1M"],
    ])


TARGETS = [("tgt", "4M", None), ("small", "2M", None), ("t2", "4M", None), ("t3", "4M", "mid"),
           ("t4", "4M", None), ("t5", "4M", None), ("ro", "4M", None), ("ex", "4M", None)]


def make(sub):
    os.mkdir(sub)
    paths = chain3(sub)
    for n, size, b in TARGETS:
        back = ["-b", f"{b}.qcow2", "-F", "qcow2"] if b else []
        qemu_img("create", "-q", "-f", "qcow2", *back, os.path.join(sub, f"{n}.qcow2"), size)
    return paths, reference(sub, paths[-1])


def add_nodes(d):
    out = []
    for n, b in (("base", None), ("mid", "base"), ("top", "mid")):
        out.append(("blockdev-add", {"driver": "qcow2", "node-name": n,
                                     "file": file(os.path.join(d, f"{n}.qcow2")), "backing": b}))
    for n, _, b in TARGETS:
        a = {"driver": "qcow2", "node-name": n, "file": file(os.path.join(d, f"{n}.qcow2")), "backing": b}
        if n == "ro":
            a["read-only"] = True
        out.append(("blockdev-add", a))
    return out


def script(d):
    """(command, arguments); ("wait", id) waits for the job to reach null and
    records the events since, in order; ("wait-status", (id, status))."""
    s = add_nodes(d)
    m = lambda **kw: ("blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt",  # noqa: E731
                                          "sync": "full", **kw})
    s += [
        ("blockdev-mirror", {}),
        ("blockdev-mirror", {"device": "top"}),
        ("blockdev-mirror", {"device": "top", "target": "tgt"}),
        ("blockdev-mirror", {"device": "top", "target": "tgt", "sync": "full"}),
        m(sync="bogus"),
        m(device="nosuch"),
        m(target="nosuch"),
        m(target="top"),
        m(target="mid"),
        m(target="base"),
        m(granularity=100),
        m(granularity=3000),
        m(granularity=1 << 27),
        m(**{"buf-size": -1}),
        m(sync="incremental"),
        m(sync="bitmap"),
        m(replaces="mid"),
        m(replaces="nosuch"),
        m(replaces="tgt"),
        m(**{"job-id": "1x"}),
        m(speed=-1),
        m(**{"on-target-error": "bogus"}),
        m(**{"copy-mode": "bogus"}),
        m(bogus=1),
        m(device="mid"),
        m(bitmap="b0"),
        # Refused once the job exists: a read-only target, one in use.
        m(target="ro"),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": os.path.join(d, "nbd.sock")}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "ex", "writable": True}),
        m(target="ex"),
        ("block-export-del", {"id": "e0"}),
        ("nbd-server-stop", {}),
        ("wait-status", ("j", "null")),
        # A slow job; refusals and changes while it runs; then a cancel.
        m(**{"job-id": "j1", "speed": 1}),
        ("query-block-jobs", {}),
        m(**{"job-id": "j2"}),
        ("blockdev-mirror", {"job-id": "j3", "device": "t2", "target": "tgt", "sync": "full"}),
        ("block-stream", {"device": "top", "job-id": "j4"}),
        ("block-job-change", {"id": "j1", "type": "mirror"}),
        ("block-job-change", {"id": "j1", "type": "mirror", "copy-mode": "background"}),
        ("block-job-change", {"id": "j1", "type": "mirror", "copy-mode": "write-blocking"}),
        ("block-job-change", {"id": "j1", "type": "mirror", "copy-mode": "background"}),
        ("block-job-change", {"id": "nosuch", "type": "mirror", "copy-mode": "background"}),
        ("block-job-complete", {"device": "j1"}),
        ("block-job-cancel", {"device": "j1"}),
        ("wait", "j1"),
        # Source and target of different sizes: the job fails once it runs.
        m(**{"job-id": "j5", "target": "small"}),
        ("wait", "j5"),
        # A full mirror to its pivot (no parent to move: the graph stays).
        m(**{"job-id": "j6"}),
        ("wait-status", ("j6", "ready")),
        ("query-block-jobs", {}),
        ("block-job-complete", {"device": "j6"}),
        ("wait", "j6"),
        # sync=top onto an image over the source's backing; cancelled once
        # ready without force: completed, no pivot.
        m(**{"job-id": "j7", "sync": "top", "target": "t3"}),
        ("wait-status", ("j7", "ready")),
        ("block-job-cancel", {"device": "j7"}),
        ("wait", "j7"),
        # sync=none: ready at once; finalized and dismissed by hand.
        m(**{"job-id": "j8", "sync": "none", "target": "t2", "auto-finalize": False,
             "auto-dismiss": False, "granularity": 1 << 20, "buf-size": 4 << 20}),
        ("wait-status", ("j8", "ready")),
        ("block-job-complete", {"device": "j8"}),
        ("wait-status", ("j8", "pending")),
        ("query-jobs", {}),
        ("job-finalize", {"id": "j8"}),
        ("wait-status", ("j8", "concluded")),
        ("job-dismiss", {"id": "j8"}),
        ("wait", "j8"),
        # A forced cancel once ready.
        m(**{"job-id": "j9", "target": "t4", "copy-mode": "write-blocking",
             "on-source-error": "stop", "on-target-error": "enospc"}),
        ("wait-status", ("j9", "ready")),
        ("query-block-jobs", {}),
        ("block-job-cancel", {"device": "j9", "force": True}),
        ("wait", "j9"),
        ("query-jobs", {}),
    ]
    return s


MINE = {"base", "mid", "top", "copy-format"}


def answer(cmd, r):
    if "error" in r:
        return ("error", r["error"]["class"], r["error"]["desc"])
    v = r["return"]
    if cmd == "query-named-block-nodes":
        return sorted((n["node-name"], n["backing_file_depth"], n["image"].get("backing-filename"))
                      for n in v if n["node-name"] in MINE)
    if cmd == "query-block-jobs":
        # Progress and busy depend on timing while a job runs.
        drop = lambda j: ("busy", "offset", "len") if j["status"] == "running" else ("busy",)  # noqa: E731
        return [{k: x for k, x in j.items() if k not in drop(j)} for j in v]
    if cmd == "query-jobs":
        drop = lambda j: ("current-progress", "total-progress") if j["status"] == "running" else ()  # noqa: E731
        return [{k: x for k, x in j.items() if k not in drop(j)} for j in v]
    return ("ok", v)


def event_view(ev):
    data = dict(ev["data"])
    if ev["event"] == "BLOCK_JOB_CANCELLED" and data.get("speed") == 1:
        # A throttled job's progress at the cancel depends on timing.
        data.pop("offset", None)
    return (ev["event"], data)


def run_script(vm, d, s):
    return qmp_script.run_script(vm, d, s, answer, event_view)


NODES = [n for n, _, _ in TARGETS] + ["top", "mid", "base"]


def compare_runs(runs):
    for i, (g, w) in enumerate(zip(runs["sluice"], runs["qsd"])):
        expect(g == w, f"step {i}:\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), "lengths differ")


def both(d, make_fn, script_fn, vm, cleanup):
    runs, images = {}, {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        paths, ref = make_fn(sub)
        s = script_fn(sub)
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = run_script(qsd, sub, s)
        else:
            runs[who] = run_script(vm, sub, s)
            for n in cleanup:
                r = vm.raw("blockdev-del", {"node-name": n})
                expect("return" in r, f"blockdev-del {n}: {r}")
        images[who] = (sub, paths, ref)
    compare_runs(runs)
    return runs, images


def same_image(a, b):
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    expect(r.returncode == 0, f"{a} and {b} differ: {r.stdout}{r.stderr}")


def case_qsd(vm, d):
    """The whole conversation on QSD and on sluice, step by step; then every
    target holds what the device showed (t3 through its backing), on both."""
    runs, images = both(d, make, script, vm, NODES)
    errors = sum(1 for g in runs["sluice"] if isinstance(g[2], tuple) and g[2][0] == "error")
    expect(errors >= 25, f"only {errors} refusals")
    for who, (sub, paths, ref) in images.items():
        for p in paths:
            check(p)
        for n in ("tgt", "t3", "t4"):
            p = os.path.join(sub, f"{n}.qcow2")
            check(p)
            compare_raw(p, ref)
        compare_raw(paths[-1], ref)
    for n in ("tgt", "t3", "t4"):
        same_image(os.path.join(images["qsd"][0], f"{n}.qcow2"), os.path.join(images["sluice"][0], f"{n}.qcow2"))


def make_drive(sub):
    os.mkdir(sub)
    paths = chain3(sub)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(sub, "ex.qcow2"), "4M")
    return paths, reference(sub, paths[-1])


def drive_script(d):
    """drive-mirror: refusals, then each mode and sync onto new files."""
    s = add_nodes(d)[:3]
    p = lambda n: os.path.join(d, n)  # noqa: E731
    m = lambda **kw: ("drive-mirror", {"job-id": "j", "device": "top", "target": p("dm.qcow2"),  # noqa: E731
                                       "sync": "full", **kw})
    s += [
        ("drive-mirror", {}),
        ("drive-mirror", {"device": "top"}),
        ("drive-mirror", {"device": "top", "target": "x"}),
        m(format="bogus"),
        m(mode="bogus"),
        m(**{"node-name": "top"}),
        m(**{"node-name": "1bad"}),
        m(target=p("nodir/x.qcow2")),
        m(target=p("none.qcow2"), mode="existing"),
        m(replaces="mid"),
        m(unmap=False, bogus=1),
        m(device="nosuch"),
        m(**{"job-id": "1x"}),
        m(speed=-1),
        m(granularity=100),
        ("wait-status", ("j", "null")),
        # sync=top onto a new image over the source's backing, by node-name.
        m(**{"job-id": "a", "sync": "top", "format": "qcow2", "node-name": "dmtop"}),
        ("wait-status", ("a", "ready")),
        ("block-job-cancel", {"device": "a", "force": True}),
        ("wait", "a"),
        # sync=none: the new image is backed by the source itself.
        m(**{"job-id": "b", "sync": "none", "target": p("dn.qcow2")}),
        ("wait-status", ("b", "ready")),
        ("block-job-complete", {"device": "b"}),
        ("wait", "b"),
        # An existing image is zeroed first: everything is copied.
        m(**{"job-id": "c", "target": p("ex.qcow2"), "mode": "existing"}),
        ("wait-status", ("c", "ready")),
        ("block-job-cancel", {"device": "c"}),
        ("wait", "c"),
        # A new raw file: only what the chain holds is copied.
        m(**{"job-id": "e", "target": p("dr.raw"), "format": "raw"}),
        ("wait-status", ("e", "ready")),
        ("block-job-cancel", {"device": "e"}),
        ("wait", "e"),
        m(**{"job-id": "f", "target": p("df.qcow2")}),
        ("wait-status", ("f", "ready")),
        ("block-job-cancel", {"device": "f"}),
        ("wait", "f"),
    ]
    return s


def case_drive(vm, d):
    """drive-mirror's conversation on QSD and on sluice, step by step; the
    images it made hold what the device showed, with QEMU's backing files."""
    runs, images = both(d, make_drive, drive_script, vm, ["top", "mid", "base"])
    for who, (sub, paths, ref) in images.items():
        for n, back in (("dm.qcow2", "mid.qcow2"), ("dn.qcow2", "top.qcow2"), ("ex.qcow2", None),
                        ("df.qcow2", None)):
            f = os.path.join(sub, n)
            check(f)
            compare_raw(f, ref)
            i = info(f)
            got = i.get("backing-filename")
            expect(got == (os.path.join(sub, back) if back else None), f"{who} {n}: backing {got}")
        compare_raw(os.path.join(sub, "dr.raw"), ref)
        expect(not os.path.exists(os.path.join(sub, "nodir")), "nodir made")
    for n in ("dm.qcow2", "dn.qcow2", "ex.qcow2", "dr.raw", "df.qcow2"):
        same_image(os.path.join(images["qsd"][0], n), os.path.join(images["sluice"][0], n))


def case_drive_pivot(vm, d):
    """drive-mirror of an exported node under verified client I/O: at
    block-job-complete the export moves onto the new image, which stays
    open (in use) after the job and holds every write."""
    sub = os.path.join(d, "p")
    paths, ref = make_drive(sub)
    for cmd, args in add_nodes(sub)[:3]:
        vm.rcmd(cmd, args)
    u = export(vm, sub, "top")
    n = 150
    p = client(u, n)
    new = os.path.join(sub, "new.qcow2")
    vm.rcmd("drive-mirror", {"job-id": "m0", "device": "top", "target": new, "sync": "top",
                             "node-name": "new", "speed": 1 * MiB})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "m0"})
    expect(p.poll() is None, "the client finished before the pivot: nothing overlapped")
    vm.rcmd("block-job-complete", {"device": "m0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "m0", "status": "null"})
    done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0]["data"], f"m0: {done}")
    ex = vm.rcmd("query-block-exports")
    expect([e["node-name"] for e in ex] == ["new"], f"export not moved onto new: {ex}")
    client_ok(p, n)
    qemu_io("-f", "raw", "-c", f"write -P 0x55 {2 * MiB} {n * 8}k", ref)
    unexport(vm)
    # The target was the command's: with its export gone, blockdev-del
    # refuses it (not the monitor's) but bdev_qcow2_delete closes it.
    vm.rcmd("bdev_qcow2_delete", {"name": "new"})
    for nd in ("top", "mid", "base"):
        vm.rcmd("blockdev-del", {"node-name": nd})
    check(new)
    compare_raw(new, ref)
    expect(info(new).get("backing-filename") == paths[1], f"backing: {info(new)}")


def libvirt_script(d):
    """libvirt's blockcopy with a shallow copy and pivot, in blockdev mode:
    the chain as file + format nodes, exported (the guest); the copy's file
    and qcow2 image made with blockdev-create over the source's backing,
    added with backing: mid; blockdev-mirror sync=top (auto-dismiss off),
    READY, block-job-complete, job-dismiss, then the old top deleted."""
    f = lambda n: os.path.join(d, n)  # noqa: E731
    s = []
    for n, b in (("base", None), ("mid", "base"), ("top", "mid")):
        s += [("blockdev-add", {"driver": "file", "node-name": f"{n}-storage", "filename": f(f"{n}.qcow2")}),
              ("blockdev-add", {"driver": "qcow2", "node-name": n, "file": f"{n}-storage", "backing": b})]
    jid = "copy-vda-copy-format"
    s += [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f("nbd.sock")}}}),
        ("block-export-add", {"type": "nbd", "id": "vda", "node-name": "top", "writable": True}),
        ("blockdev-create", {"job-id": "create-file", "options": {"driver": "file", "filename": f("copy.qcow2"),
                                                                  "size": 0}}),
        ("job", "create-file"),
        ("blockdev-add", {"driver": "file", "node-name": "copy-storage", "filename": f("copy.qcow2")}),
        ("blockdev-create", {"job-id": "create-format", "options": {
            "driver": "qcow2", "file": "copy-storage", "size": 4 * MiB, "backing-file": f("mid.qcow2"),
            "backing-fmt": "qcow2"}}),
        ("job", "create-format"),
        ("blockdev-add", {"driver": "qcow2", "node-name": "copy-format", "file": "copy-storage",
                          "backing": "mid"}),
        ("blockdev-mirror", {"job-id": jid, "device": "top", "target": "copy-format", "sync": "top",
                             "auto-finalize": True, "auto-dismiss": False}),
        ("wait-status", (jid, "ready")),
        ("query-block-jobs", {}),
        ("block-job-complete", {"device": jid}),
        ("wait-status", (jid, "concluded")),
        ("query-jobs", {}),
        ("job-dismiss", {"id": jid}),
        ("wait", jid),
        ("query-block-exports", {}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "top-storage"}),
        ("query-named-block-nodes", {}),
    ]
    return s


def case_libvirt(vm, d):
    """libvirt's blockcopy flow on QSD and on sluice, step by step; the guest
    (the export) ends on the copy, which shows what top showed and takes
    writes; the copy sits on mid as its backing file."""
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        paths, ref = make_drive(sub)
        s = libvirt_script(sub)

        def after(v):
            u = f"nbd+unix:///top?socket={os.path.join(sub, 'nbd.sock')}"
            qemu_io("-f", "raw", "-c", "read -P 0x33 1M 512k", "-c", "write -P 0x66 3M 64k", u)
            qemu_io("-f", "raw", "-c", "write -P 0x66 3M 64k", ref)
            v.rcmd("block-export-del", {"id": "vda"})
            v.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "vda"})
            v.rcmd("nbd-server-stop")
            for n in ("copy-format", "copy-storage", "mid", "mid-storage", "base", "base-storage"):
                r = v.raw("blockdev-del", {"node-name": n})
                expect("return" in r, f"{who}: blockdev-del {n}: {r}")
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = run_script(qsd, sub, s)
                after(qsd)
        else:
            runs[who] = run_script(vm, sub, s)
            after(vm)
        copy = os.path.join(sub, "copy.qcow2")
        check(copy)
        compare_raw(copy, ref)
        expect(info(copy).get("backing-filename") == paths[1], f"{who}: copy's backing {info(copy)}")
        for p in paths:
            check(p)
    compare_runs(runs)


def client(u, n, base=2 * MiB):
    """One NBD connection writing n 8 KiB blocks 20 ms apart (so it spans
    the mirror and its pivot), then reading every one back."""
    cmds = []
    for i in range(n):
        cmds += ["-c", f"write -P 0x55 {base + i * 8 * KiB} 8k", "-c", "sleep 20"]
    cmds += ["-c", f"read -P 0x55 {base} {n * 8}k", "-c", "read -P 0x33 1M 512k", "-c", "read -P 0x22 512k 512k"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, u],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def export(vm, sub, node):
    sock = os.path.join(sub, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": node, "writable": True})
    return f"nbd+unix:///{node}?socket={sock}"


def unexport(vm):
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
    vm.rcmd("nbd-server-stop")


def client_ok(p, n):
    out, errs = p.communicate(timeout=120)
    expect(p.returncode == 0 and "fail" not in out and "error" not in (out + errs).lower(), out + errs)
    expect(out.count("wrote 8192/8192") == n and out.count("read ") == 3, out)


def case_nbd_io(vm, d):
    """top exported over NBD; a client writes and verifies through it while
    the chain is mirrored onto tgt (throttled, so it spans the job) and
    across the pivot; the export ends on tgt, which shows every write."""
    sub = os.path.join(d, "n")
    paths, ref = make(sub)
    for cmd, args in add_nodes(sub):
        vm.rcmd(cmd, args)
    u = export(vm, sub, "top")
    n = 200
    p = client(u, n)
    vm.rcmd("blockdev-mirror", {"job-id": "m0", "device": "top", "target": "tgt", "sync": "full",
                                "speed": 2 * MiB})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "m0"})
    time.sleep(0.3)
    expect(p.poll() is None, "the client finished before the pivot: nothing overlapped")
    vm.rcmd("block-job-complete", {"device": "m0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "m0", "status": "null"})
    done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0]["data"], f"m0: {done}")
    ex = vm.rcmd("query-block-exports")
    expect([e["node-name"] for e in ex] == ["tgt"], f"export not moved onto tgt: {ex}")
    client_ok(p, n)
    qemu_io("-f", "raw", "-c", f"write -P 0x55 {2 * MiB} {n * 8}k", ref)
    unexport(vm)
    for nd in NODES:
        vm.rcmd("blockdev-del", {"node-name": nd})
    tgt = os.path.join(sub, "tgt.qcow2")
    check(tgt)
    compare_raw(tgt, ref)
    for path in paths:
        check(path)


def case_soft_cancel(vm, d):
    """block-job-cancel without force once ready: the job completes without
    the pivot, and the target is a consistent copy of that moment, holding
    writes made just before the cancel that the throttled job had not
    copied yet (QEMU drains them likewise)."""
    sub = os.path.join(d, "s")
    paths, ref = make(sub)
    for cmd, args in add_nodes(sub):
        vm.rcmd(cmd, args)
    u = export(vm, sub, "top")
    vm.rcmd("blockdev-mirror", {"job-id": "s0", "device": "top", "target": "tgt", "sync": "full"})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "s0"})
    # 3 MiB the job, now throttled, needs many seconds to copy.
    vm.rcmd("block-job-set-speed", {"device": "s0", "speed": 64 * KiB})
    for img in (u, ref):
        qemu_io("-f", "raw", "-c", "write -P 0x77 1M 3M", img)
    vm.rcmd("block-job-cancel", {"device": "s0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "s0", "status": "null"})
    done = [e["data"] for e in vm.pending if e["event"].startswith("BLOCK_JOB_")]
    expect(len(done) == 1 and "error" not in done[0], f"s0: {done}")
    ex = vm.rcmd("query-block-exports")
    expect([e["node-name"] for e in ex] == ["top"], f"export moved: {ex}")
    unexport(vm)
    for nd in NODES:
        vm.rcmd("blockdev-del", {"node-name": nd})
    tgt = os.path.join(sub, "tgt.qcow2")
    check(tgt)
    compare_raw(paths[-1], ref)
    compare_raw(tgt, ref)


def case_target_errors(vm, d):
    """on-target-error: stop pauses the job on a failed write to the target
    (BLOCK_JOB_ERROR, io-status nospace), block-job-resume copies the range
    again and the job converges; report fails the job with the error.
    The target is an error-injection bdev over a raw file."""
    sub = os.path.join(d, "e")
    paths, ref = make(sub)
    for cmd, args in add_nodes(sub)[:3]:
        vm.rcmd(cmd, args)
    raw = os.path.join(sub, "t.raw")
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
    vm.rcmd("bdev_uring_create", {"name": "tfile", "filename": raw})
    vm.rcmd("bdev_error_create", {"base_name": "tfile"})
    vm.rcmd("bdev_error_inject_error", {"name": "EE_tfile", "io_type": "write", "error_type": "enospc",
                                        "num": 1})
    vm.rcmd("blockdev-mirror", {"job-id": "e0", "device": "top", "target": "EE_tfile", "sync": "full",
                                "on-target-error": "stop", "on-source-error": "report"})
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30, {"device": "e0"})
    expect(ev["data"] == {"device": "e0", "operation": "write", "action": "stop"}, f"{ev}")
    vm.event_wait("JOB_STATUS_CHANGE", 30, {"id": "e0", "status": "paused"})
    j = vm.rcmd("query-block-jobs")[0]
    expect(j["paused"] and j["io-status"] == "nospace" and not j["ready"], f"{j}")
    vm.rcmd("block-job-resume", {"device": "e0"})
    vm.event_wait("BLOCK_JOB_READY", 30, {"device": "e0"})
    vm.rcmd("block-job-cancel", {"device": "e0"})
    vm.event_wait("JOB_STATUS_CHANGE", 30, {"id": "e0", "status": "null"})
    done = [e["data"] for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0], f"e0: {done}")
    vm.pending = []
    # report: one failed write fails the job with its error.
    vm.rcmd("bdev_error_inject_error", {"name": "EE_tfile", "io_type": "write", "error_type": "failure",
                                        "num": 1})
    vm.rcmd("blockdev-mirror", {"job-id": "e1", "device": "top", "target": "EE_tfile", "sync": "full"})
    vm.event_wait("JOB_STATUS_CHANGE", 30, {"id": "e1", "status": "null"})
    errs = [e["data"] for e in vm.pending if e["event"] == "BLOCK_JOB_ERROR"]
    expect(errs == [{"device": "e1", "operation": "write", "action": "report"}], f"{errs}")
    done = [e["data"] for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and done[0].get("error") == "Input/output error", f"e1: {done}")
    vm.rcmd("bdev_error_delete", {"name": "EE_tfile"})
    vm.rcmd("bdev_uring_delete", {"name": "tfile"})
    for nd in ("top", "mid", "base"):
        vm.rcmd("blockdev-del", {"node-name": nd})
    compare_raw(paths[-1], ref)
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", raw, ref], capture_output=True,
                       text=True)
    expect(r.returncode == 0, f"target after the resumed mirror: {r.stdout}{r.stderr}")


def case_device(vm, d):
    """A named device (bdev_qcow2_open) mirrored onto a node: the job's id
    is the device's name, and at block-job-complete the device moves onto
    the target, where its writes then land."""
    sub = os.path.join(d, "dev")
    paths, ref = make(sub)
    vm.open_nodes(paths, ["base", "mid", "top"], device="drive0")
    tgt = os.path.join(sub, "tgt.qcow2")
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": file(tgt)})
    vm.rcmd("blockdev-mirror", {"device": "drive0", "target": "tgt", "sync": "full"})
    vm.event_wait("BLOCK_JOB_READY", 60, {"device": "drive0"})
    vm.rcmd("block-job-complete", {"device": "drive0"})
    vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "drive0", "status": "null"})
    done = [e["data"] for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
    expect(len(done) == 1 and "error" not in done[0], f"{done}")
    ins = vm.rcmd("query-block")[0]["inserted"]
    expect(ins["file"] == tgt and ins["backing_file_depth"] == 0, f"device not on tgt: {ins}")
    u = export(vm, sub, "drive0")
    for img in (u, ref):
        qemu_io("-f", "raw", "-c", "write -P 0x66 3M 64k", img)
    unexport(vm)
    vm.close("drive0")
    vm.close("top")
    check(tgt)
    compare_raw(tgt, ref)
    for p in paths:
        check(p)


def loader(u, size, seconds, seed):
    """Random 64 KiB writes through NBD for about `seconds`, as fast as
    qemu-io goes (one request at a time)."""
    rnd = random.Random(seed)
    cmds = []
    for _ in range(int(seconds * 400)):
        off = rnd.randrange(size // (64 * KiB)) * 64 * KiB
        cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {off} 64k"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, u], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def case_write_blocking(vm, d):
    """A throttled background mirror under a continuous random-write load
    does not converge; switched to write-blocking with block-job-change it
    does (writes reach both sides before completing), and the target then
    equals the source byte for byte."""
    sub = os.path.join(d, "w")
    os.mkdir(sub)
    size = 16 * MiB
    src = os.path.join(sub, "src.qcow2")
    dst = os.path.join(sub, "dst.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, str(size))
    qemu_io("-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", src)
    qemu_img("create", "-q", "-f", "qcow2", dst, str(size))
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "src", "file": file(src)})
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "dst", "file": file(dst)})
    u = export(vm, sub, "src")
    load = loader(u, size, 60, 1)
    try:
        vm.rcmd("blockdev-mirror", {"job-id": "w0", "device": "src", "target": "dst", "sync": "full",
                                    "speed": 4 * MiB})
        time.sleep(4)
        j = vm.rcmd("query-block-jobs")[0]
        expect(not j["ready"] and not j["actively-synced"], f"background mirror converged under load: {j}")
        expect(load.poll() is None, "the load stopped")
        t0 = time.time()
        vm.rcmd("block-job-change", {"id": "w0", "type": "mirror", "copy-mode": "write-blocking"})
        vm.event_wait("BLOCK_JOB_READY", 30, {"device": "w0"})
        took = time.time() - t0
        expect(load.poll() is None, "the load stopped before the write-blocking mirror converged")
        deadline = time.time() + 10
        while not vm.rcmd("query-block-jobs")[0]["actively-synced"]:
            expect(time.time() < deadline, "never actively synced")
            time.sleep(0.05)
        r = vm.raw("block-job-change", {"id": "w0", "type": "mirror", "copy-mode": "background"})
        expect(r.get("error", {}).get("desc") == "Change to copy mode 'background' is not implemented", f"{r}")
        # The load stops (what it sent is done: writes after the pivot
        # would reach dst alone), then the pivot.
        load.kill()
        load.wait()
        vm.rcmd("block-job-complete", {"device": "w0"})
        vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "w0", "status": "null"})
        done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
        expect(len(done) == 1 and "error" not in done[0]["data"], f"w0: {done}")
        ex = vm.rcmd("query-block-exports")
        expect([e["node-name"] for e in ex] == ["dst"], f"export not moved: {ex}")
    finally:
        load.kill()
        load.wait()
    unexport(vm)
    for nd in ("src", "dst"):
        vm.rcmd("blockdev-del", {"node-name": nd})
    check(src)
    check(dst)
    # No write after the pivot reached src: the target is the source.
    same_image(src, dst)
    print(f"write-blocking converged in {took:.2f}s under load")


def case_targets(vm, d):
    """A device mirrored onto RAM (a malloc bdev), then onto a remote node
    (the NBD client over qemu-storage-daemon's export of a raw file): READY,
    the device moved onto the target at complete, its content the chain's
    (read back over sluice's own NBD export, and from the remote file)."""
    paths = make_chain(d, ["base", "top"], "64M", [["write -P 0x5 0 40M"], ["write -P 0x7 8M 4M"]])
    ref = reference(d, paths[-1])

    def mirror_onto(target):
        vm.rcmd("blockdev-mirror", {"job-id": "m", "device": "drive0", "target": target, "sync": "full"})
        vm.event_wait("BLOCK_JOB_READY", 60, {"device": "m"})
        vm.rcmd("block-job-complete", {"device": "m"})
        ev = vm.event_wait("BLOCK_JOB_COMPLETED", 60, {"device": "m"})
        expect("error" not in ev["data"] and ev["data"]["offset"] == ev["data"]["len"], f"{target}: {ev}")

    def device_reads_as_ref(what):
        sock = os.path.join(d, "own.sock")
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "drive0"})
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                            f"nbd+unix:///drive0?socket={sock}", ref], capture_output=True, text=True)
        expect(r.returncode == 0, f"{what}: the device does not read as the chain: {r.stdout}{r.stderr}")
        vm.rcmd("block-export-del", {"id": "e0"})
        vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
        vm.rcmd("nbd-server-stop")

    vm.open(name="drive0", filename=paths[-1])
    vm.rcmd("bdev_malloc_create", {"name": "ram0", "num_blocks": 64 * 2048, "block_size": 512})
    mirror_onto("ram0")
    device_reads_as_ref("onto RAM")
    dst = os.path.join(d, "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, "64M")
    qsock = os.path.join(d, "qsd-nbd.sock")
    with qsd_monitor(d) as qsd:
        qsd.rcmd("blockdev-add", {"driver": "file", "node-name": "dst", "filename": dst})
        qsd.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": qsock}}})
        qsd.rcmd("block-export-add", {"type": "nbd", "id": "q0", "node-name": "dst", "writable": True})
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "remote", "export": "dst",
                                 "server": {"type": "unix", "path": qsock}})
        mirror_onto("remote")
        device_reads_as_ref("onto the remote node")
        vm.close("drive0")
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", dst, ref], capture_output=True, text=True)
    expect(r.returncode == 0, f"the remote file does not hold the chain: {r.stdout}{r.stderr}")


run_case(globals())

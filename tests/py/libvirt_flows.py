"""libvirt's block operations as the QMP sequences libvirt (-blockdev mode,
libvirt 7..10) sends, run on qemu-storage-daemon 10 and on sluice and
compared step by step: replies, refusals, events in order
(JOB_STATUS_CHANGE, BLOCK_JOB_*), `query-named-block-nodes {flat: true}` as
libvirt probes it; the images judged by qemu-img check / compare after.

libvirt's conventions reproduced: nodes `libvirt-N-storage` (file:
auto-read-only, discard unmap) under `libvirt-N-format` (qcow2, backing by
node name, read-only below the top); jobs with auto-finalize on and
auto-dismiss off, each `job-dismiss`ed once concluded; the nodes a job took
out of the chain removed by `blockdev-del`, format then storage; a new
overlay precreated, formatted with `blockdev-create`, added with
`backing: null`, and linked with a `transaction` of one
`blockdev-snapshot`. An NBD export of the top stands for the guest's disk
(QEMU moves it as it moves a device)."""

import asyncio
import os
import re
import shutil
import subprocess
import time

from stream_common import make_chain, qemu_img, qemu_io, qsd_monitor, reference, run_case
from qmp_script import scrub

MiB = 1 << 20


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)





def view(cmd, r):
    if "error" in r:
        return ("error", r["error"]["class"], r["error"]["desc"])
    v = r["return"]
    if cmd == "query-named-block-nodes":
        # What libvirt reads of it (qemuBlockNodeNameGetBackingChain and
        # qemuMonitorJSONBlockGetNamedNodeData): names, chain, sizes, format.
        # Storage nodes: sluice's differ from QEMU's outside these flows
        # too (an auto-read-only file under a read-only image reads as
        # read-only; an image's file is grown ahead), so only names count.
        return ("ok", sorted((n["node-name"], n["drv"], n["ro"], n["backing_file_depth"],
                              n["image"]["virtual-size"], n["image"].get("backing-filename"))
                             if n["drv"] != "file" else (n["node-name"], "file")
                             for n in v if n["node-name"].startswith("libvirt-")))
    if cmd == "query-block-exports":
        return ("ok", sorted((e["id"], e["node-name"]) for e in v))
    if cmd == "query-jobs":
        return ("ok", [{k: x for k, x in j.items() if k != "current-progress"} for j in v])
    return ("ok", v)


def event_view(ev):
    data = dict(ev["data"])
    if ev["event"] in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
        data.pop("offset", None)
        data.pop("len", None)
    return (ev["event"], data)


def until(vm, jid, status, timeout=60.0):
    """Waits until the job's change to `status` arrived; returns the job and
    block events since the last wait, in arrival order."""
    deadline = time.time() + timeout
    while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": jid, "status": status}
                  for e in vm.pending):
        expect(time.time() < deadline, f"{jid} never {status}: {vm.pending}")
        try:
            ev = vm.q.pull_event(wait=0.1)
        except (TimeoutError, asyncio.TimeoutError):
            ev = None
        if ev is not None:
            vm.pending.append(ev)
    got = [event_view(e) for e in vm.pending if e["event"].startswith(("JOB_", "BLOCK_JOB_"))]
    vm.pending = []
    return got


def run_script(vm, d, steps):
    out = []
    for cmd, args in steps:
        if cmd == "chattr":
            r = subprocess.run(["chattr", *args], capture_output=True, text=True)
            expect(r.returncode == 0, f"chattr {args}: {r.stderr}")
            out.append(("chattr", scrub(args, d)))
        elif cmd == "locks":
            out.append(("locks", scrub(args, d), scrub(lock_probe(args), d)))
        elif cmd == "until":
            out.append(("until", args, until(vm, *args)))
        else:
            out.append(scrub((cmd, args, view(cmd, vm.raw(cmd, args))), d))
    return out


def lock_probe(path):
    """What another process may do with `path`: open it to write (qemu-io),
    and to read (qemu-img info, no -U); return codes and first lines."""
    out = []
    for argv in (["qemu-io", "-c", "read 0 512", path], ["qemu-img", "info", path]):
        r = subprocess.run(argv, capture_output=True, text=True)
        out.append((argv[0], r.returncode, (r.stderr.splitlines() or [""])[0]))
    return out


def storage(n, path):
    return ("blockdev-add", {"driver": "file", "filename": path, "node-name": f"libvirt-{n}-storage",
                             "auto-read-only": True, "discard": "unmap"})


def fmt(n, backing, ro):
    return ("blockdev-add", {"node-name": f"libvirt-{n}-format", "read-only": ro, "driver": "qcow2",
                             "file": f"libvirt-{n}-storage", "backing": backing})


def chain(d, deep=False):
    """base (3) <- mid (2) <- top (1), 4 MiB, each writing its own pattern
    (`deep`: base (4) <- mid2 (3) <- mid (2) <- top (1)); the disk's
    frontend an NBD export of the top."""
    names, writes = ["base", "mid", "top"], [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 1M 1M", "write -z 3M 256k"],
        ["write -P 0x33 1536k 1M"],
    ]
    if deep:
        names.insert(1, "mid2")
        writes.insert(1, ["write -P 0x44 512k 1M", "write -z 2M 512k"])
    paths = make_chain(d, names, "4M", writes)
    return paths, reference(d, paths[-1])


def attach(d):
    """libvirt's chain: the layers below the top read-only (a commit reopens
    its base read-write for the job and read-only after, as QEMU does)."""
    return [
        storage(3, f"{d}/base.qcow2"), fmt(3, None, True),
        storage(2, f"{d}/mid.qcow2"), fmt(2, "libvirt-3-format", True),
        storage(1, f"{d}/top.qcow2"), fmt(1, "libvirt-2-format", False),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/nbd.sock"}}}),
        ("block-export-add", {"type": "nbd", "id": "vda", "node-name": "libvirt-1-format",
                              "writable": True}),
        ("query-named-block-nodes", {"flat": True}),
    ]


def detach(*ns):
    out = []
    for n in ns:
        out += [("blockdev-del", {"node-name": f"libvirt-{n}-format"}),
                ("blockdev-del", {"node-name": f"libvirt-{n}-storage"})]
    return out


PROBE = [("query-named-block-nodes", {"flat": True}), ("query-block-exports", {}), ("query-jobs", {})]


def flow_active_commit(d):
    """virsh blockcommit vda --active --pivot"""
    j = "commit-vda-libvirt-3-format"
    return attach(d) + [
        ("block-commit", {"device": "libvirt-1-format", "job-id": j, "top-node": "libvirt-1-format",
                          "base-node": "libvirt-3-format", "auto-finalize": True, "auto-dismiss": False}),
        ("until", (j, "ready")),
        ("query-jobs", {}),
        # Base reopened read-write while the job runs (and after the pivot,
        # as the active layer).
        ("query-named-block-nodes", {"flat": True}),
        ("job-complete", {"id": j}),
        ("until", (j, "concluded")),
        ("job-dismiss", {"id": j}),
        ("until", (j, "null")),
        *PROBE,
        *detach(1, 2),
        *PROBE,
    ]


def flow_active_commit_abort(d):
    """virsh blockcommit vda --active, then virsh blockjob vda --abort once
    ready: no pivot, base read-only again, its lock as before"""
    j = "commit-vda-libvirt-3-format"
    return attach(d) + [
        ("locks", f"{d}/base.qcow2"),
        ("block-commit", {"device": "libvirt-1-format", "job-id": j, "top-node": "libvirt-1-format",
                          "base-node": "libvirt-3-format", "auto-finalize": True, "auto-dismiss": False}),
        ("until", (j, "ready")),
        ("query-named-block-nodes", {"flat": True}),
        ("locks", f"{d}/base.qcow2"),
        ("job-cancel", {"id": j}),
        ("until", (j, "concluded")),
        ("job-dismiss", {"id": j}),
        ("until", (j, "null")),
        *PROBE,
        ("locks", f"{d}/base.qcow2"),
    ]


def flow_intermediate_commit(d):
    """virsh blockcommit vda --top vda[1] --base vda[2] --bandwidth 1B (mid
    into base), then virsh blockjob vda --bandwidth 0; base's image lock as
    another process finds it before, during and after the job"""
    j = "commit-vda-libvirt-3-format"
    return attach(d) + [
        ("locks", f"{d}/base.qcow2"),
        ("block-commit", {"device": "libvirt-1-format", "job-id": j, "top-node": "libvirt-2-format",
                          "base-node": "libvirt-3-format", "backing-file": f"{d}/base.qcow2",
                          "speed": 1, "auto-finalize": True, "auto-dismiss": False}),
        # Base reopened read-write while the job runs, read-only after.
        ("query-named-block-nodes", {"flat": True}),
        ("locks", f"{d}/base.qcow2"),
        ("block-job-set-speed", {"device": j, "speed": 0}),
        ("until", (j, "concluded")),
        ("job-dismiss", {"id": j}),
        ("until", (j, "null")),
        *PROBE,
        ("locks", f"{d}/base.qcow2"),
        *detach(2),
        *PROBE,
    ]


def flow_deep_intermediate_commit(d):
    """virsh blockcommit vda --top vda[2] --base vda[3] --bandwidth 1B on a
    chain of four (mid2 into base): the overlay above top (mid) is
    read-only too; QEMU rewrites its header and it stays read-only."""
    j = "commit-vda-libvirt-4-format"
    return [
        storage(4, f"{d}/base.qcow2"), fmt(4, None, True),
        storage(3, f"{d}/mid2.qcow2"), fmt(3, "libvirt-4-format", True),
        *attach(d)[2:],
        ("block-commit", {"device": "libvirt-1-format", "job-id": j, "top-node": "libvirt-3-format",
                          "base-node": "libvirt-4-format", "speed": 1, "auto-finalize": True,
                          "auto-dismiss": False}),
        ("query-named-block-nodes", {"flat": True}),
        ("block-job-set-speed", {"device": j, "speed": 0}),
        ("until", (j, "concluded")),
        ("job-dismiss", {"id": j}),
        ("until", (j, "null")),
        *PROBE,
        *detach(3),
        *PROBE,
    ]


def flow_commit_refused(d):
    """virsh blockcommit whose base file cannot be opened for writing
    (immutable: refused even to root): QEMU's reopen error, nothing changed.
    (QSD also emits JOB_STATUS_CHANGE created then null for the job it
    created before the reopen failed; sluice refuses before creating it.)"""
    j = "commit-vda-libvirt-3-format"
    return [("chattr", ["+i", f"{d}/base.qcow2"])] + attach(d) + [
        ("block-commit", {"device": "libvirt-1-format", "job-id": j, "top-node": "libvirt-2-format",
                          "base-node": "libvirt-3-format", "auto-finalize": True, "auto-dismiss": False}),
        ("block-commit", {"device": "libvirt-1-format", "job-id": j, "top-node": "libvirt-1-format",
                          "base-node": "libvirt-3-format", "auto-finalize": True, "auto-dismiss": False}),
        ("chattr", ["-i", f"{d}/base.qcow2"]),
        ("query-named-block-nodes", {"flat": True}),
        ("query-jobs", {}),
    ]


def flow_pull(d):
    """virsh blockpull vda (the whole chain into the top)"""
    j = "pull-vda-libvirt-1-format"
    return attach(d) + [
        ("block-stream", {"device": "libvirt-1-format", "job-id": j, "auto-finalize": True,
                          "auto-dismiss": False}),
        ("until", (j, "concluded")),
        ("job-dismiss", {"id": j}),
        ("until", (j, "null")),
        *PROBE,
        *detach(2, 3),
        *PROBE,
    ]


def flow_snapshot(d):
    """virsh snapshot-create-as --disk-only (one disk, through transaction)"""
    j = "create-libvirt-4-format"
    return attach(d) + [
        storage(4, f"{d}/snap.qcow2"),
        ("blockdev-create", {"job-id": j, "options": {
            "driver": "qcow2", "file": "libvirt-4-storage", "size": 4 * MiB,
            "backing-file": f"{d}/top.qcow2", "backing-fmt": "qcow2"}}),
        ("until", (j, "concluded")),
        ("job-dismiss", {"id": j}),
        ("until", (j, "null")),
        fmt(4, None, False),
        ("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {
            "node": "libvirt-1-format", "overlay": "libvirt-4-format"}}]}),
        *PROBE,
    ]


# Images the daemon must hold open read-only only at a flow's end: the
# layers libvirt added read-only, a commit's base reopened read-only again
# (ro in query-named-block-nodes also reads true for a node whose lock was
# lowered, so the descriptors are what shows the reopen).
READ_ONLY_AFTER = {
    "active_commit_abort": ["base.qcow2", "mid.qcow2"],
    "intermediate_commit": ["base.qcow2"],
    "deep_intermediate_commit": ["base.qcow2", "mid.qcow2"],
    "commit_refused": ["base.qcow2", "mid.qcow2"],
}


def writable_holders(path):
    """(pid, fd) of every descriptor on `path` open for writing, from /proc."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags = int(re.search(r"flags:\s*([0-7]+)", f.read()).group(1), 8)
            except OSError:
                continue
            if flags & os.O_ACCMODE != os.O_RDONLY:
                out.append((pid, fd))
    return out


FLOWS = {
    "active_commit": (flow_active_commit, ["base.qcow2"], [4, 3]),
    "active_commit_abort": (flow_active_commit_abort, ["top.qcow2"], [1, 2, 3]),
    "intermediate_commit": (flow_intermediate_commit, ["top.qcow2", "base.qcow2"], [1, 3]),
    "deep_intermediate_commit": (flow_deep_intermediate_commit,
                                 ["top.qcow2", "mid.qcow2", "base.qcow2"], [1, 2, 4]),
    "commit_refused": (flow_commit_refused, ["top.qcow2", "base.qcow2"], [1, 2, 3]),
    "pull": (flow_pull, ["top.qcow2"], [1]),
    "snapshot": (flow_snapshot, ["snap.qcow2", "top.qcow2"], [4, 1, 2, 3]),
}


def case_flow(vm, d, name):
    script, check_images, teardown = FLOWS[name]
    runs, dirs, refs = {}, {}, {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        shutil.rmtree(sub, ignore_errors=True)
        os.makedirs(sub)
        open(os.path.join(sub, "snap.qcow2"), "wb").close()  # libvirt precreates it
        _, refs[who] = chain(sub, deep=name.startswith("deep"))
        dirs[who] = sub
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = run_script(qsd, sub, script(sub))
        else:
            runs[who] = run_script(vm, sub, script(sub))
            for img in READ_ONLY_AFTER.get(name, []):
                held = writable_holders(os.path.join(sub, img))
                expect(held == [], f"{name}: {img} still open for writing: {held}")
            # After the pivot base is the active layer: writable (which also
            # shows that the probe sees a writer).
            if name == "active_commit":
                held = writable_holders(os.path.join(sub, "base.qcow2"))
                expect(held != [], f"{name}: base not writable after the pivot")
            # Leave the daemon empty for the next flow.
            vm.raw("block-export-del", {"id": "vda", "mode": "hard"})
            time.sleep(0.1)
            vm.raw("nbd-server-stop", {})
            for n in teardown:
                for suffix in ("format", "storage"):
                    vm.raw("blockdev-del", {"node-name": f"libvirt-{n}-{suffix}"})
    for i, (g, w) in enumerate(zip(runs["sluice"], runs["qsd"])):
        expect(g == w, f"{name} step {i}:\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), "lengths differ")
    for img in check_images:
        q, s = (os.path.join(dirs[w], img) for w in ("qsd", "sluice"))
        r = subprocess.run(["qemu-img", "check", "-U", s], capture_output=True, text=True)
        expect(r.returncode == 0, f"qemu-img check {s}: {r.stdout}{r.stderr}")
        r = subprocess.run(["qemu-img", "compare", "-U", q, s], capture_output=True, text=True)
        expect(r.returncode == 0, f"{name}: {img} differs from QSD's: {r.stdout}{r.stderr}")
        info_q = qemu_img("info", "-U", q).replace(dirs["qsd"], "D")
        info_s = qemu_img("info", "-U", s).replace(dirs["sluice"], "D")
        bq = [x for x in info_q.splitlines() if x.startswith("backing file")]
        bs = [x for x in info_s.splitlines() if x.startswith("backing file")]
        expect(bq == bs, f"{name}: {img} backing: sluice {bs} qsd {bq}")
    # The guest's view is what it was before the operation.
    top = os.path.join(dirs["sluice"], check_images[0])
    r = subprocess.run(["qemu-img", "compare", "-U", refs["sluice"], top], capture_output=True, text=True)
    expect(r.returncode == 0, f"{name}: guest view changed: {r.stdout}{r.stderr}")


def case_active_commit(vm, d):
    case_flow(vm, d, "active_commit")


def case_active_commit_abort(vm, d):
    case_flow(vm, d, "active_commit_abort")


def case_intermediate_commit(vm, d):
    case_flow(vm, d, "intermediate_commit")


def case_deep_intermediate_commit(vm, d):
    case_flow(vm, d, "deep_intermediate_commit")


def case_commit_refused(vm, d):
    probe = os.path.join(d, "chattr-probe")
    open(probe, "wb").close()
    r = subprocess.run(["chattr", "+i", probe], capture_output=True, text=True)
    subprocess.run(["chattr", "-i", probe], capture_output=True)
    if r.returncode != 0:
        # Needs root on a filesystem with the immutable flag (ext4, xfs, btrfs).
        print(f"SKIP: chattr +i does not work here: {r.stderr.strip()}")
        return
    try:
        case_flow(vm, d, "commit_refused")
    finally:
        for who in ("qsd", "sluice"):
            subprocess.run(["chattr", "-i", os.path.join(d, who, "base.qcow2")], capture_output=True)


def case_pull(vm, d):
    case_flow(vm, d, "pull")


def case_snapshot(vm, d):
    case_flow(vm, d, "snapshot")


if __name__ == "__main__":
    run_case(globals())

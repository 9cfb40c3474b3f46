"""blockdev-add / blockdev-del the qemu-storage-daemon way, through qemu.qmp:
images opened and closed as nodes, exported over NBD, streamed; errors compared
with qemu-storage-daemon 10's own answers."""

import json
import os
import socket
import subprocess
import time

from stream_common import (Vm, qsd_monitor, check, compare_raw, depth_at, info, make_chain, parse_args,
                           qmap, qemu_img, qemu_io, reference)

MiB = 1 << 20


def err(r):
    if not ("error" in r):
        raise AssertionError(r)
    return r["error"]


def nodes(vm):
    return {n["node-name"]: n for n in vm.cmd("query-named-block-nodes")}


def nbd_start(vm, d):
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    return sock


def uri(sock, name):
    return f"nbd+unix:///{name}?socket={sock}"


def export_del(vm, eid):
    vm.cmd("block-export-del", id=eid)
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": eid})


def case_qsd_way(vm, d):
    """A file node, a qcow2 node over it (chain from the headers), NBD export,
    a client write, block-stream, then everything closed with blockdev-del."""
    paths = make_chain(d, ["base", "mid", "top"], "8M", [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 1M 2M"],
        ["write -P 0x33 2560k 512k"],
    ])
    ref = reference(d, paths[-1])
    qemu_io("-f", "raw", "-c", "write -P 0x44 3M 64k", ref)
    vm.cmd("blockdev-add", driver="file", node_name="top-file", filename=paths[-1])
    vm.cmd("blockdev-add", driver="qcow2", node_name="top", file="top-file")
    n = nodes(vm)
    if not (n["top"]["drv"] == "qcow2" and n["top"]["backing_file_depth"] == 2):
        raise AssertionError(n["top"])
    if not (n["top-file"]["drv"] == "file" and n["top-file"]["file"] == paths[-1]):
        raise AssertionError(n["top-file"])
    if not (n["top"]["image"]["backing-image"]["filename"] == paths[1]):
        raise AssertionError(n["top"])
    sock = nbd_start(vm, d)
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="top", writable=True)
    qemu_io("-f", "raw", "-c", "write -P 0x44 3M 64k", uri(sock, "top"))
    vm.cmd("block-stream", job_id="s0", device="top")
    vm.wait_until_completed(drive="s0")
    if not (nodes(vm)["top"]["backing_file_depth"] == 0):
        raise AssertionError('failed: nodes(vm)["top"]["backing_file_depth"] == 0')
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock, "top"), ref],
                       capture_output=True, text=True)
    if not (r.returncode == 0):
        raise AssertionError(r.stdout + r.stderr)
    export_del(vm, "e0")
    r = vm.qmp("blockdev-del", node_name="top-file")
    if not (err(r) == {"class": "GenericError", "desc": "Block device top-file is in use"}):
        raise AssertionError(r)
    vm.cmd("blockdev-del", node_name="top")
    # The file node is a node of its own again.
    if not (set(nodes(vm)) == {"top-file"}):
        raise AssertionError(nodes(vm))
    vm.cmd("blockdev-del", node_name="top-file")
    if not (nodes(vm) == {}):
        raise AssertionError(nodes(vm))
    check(paths[-1])
    i = info(paths[-1])
    if not ("backing-filename" not in i):
        raise AssertionError(i)
    compare_raw(paths[-1], ref)
    # Closed cleanly: the file is trimmed back from its growth reserve.
    if not (os.path.getsize(paths[-1]) < 10 * MiB):
        raise AssertionError(os.path.getsize(paths[-1]))


def case_backing_forms(vm, d):
    """backing: "<node>" reads through the named node; backing: null reads
    the image alone (what only the backing had reads as zeroes)."""
    base, top = make_chain(d, ["base", "top"], "4M", [
        ["write -P 0x11 0 1M"],
        ["write -P 0x22 1M 64k"],
    ])
    sock = nbd_start(vm, d)
    vm.cmd("blockdev-add", driver="qcow2", node_name="base", read_only=True,
           file={"driver": "file", "filename": base})
    vm.cmd("blockdev-add", driver="qcow2", node_name="top", backing="base",
           file={"driver": "file", "filename": top, "node-name": "top-f"})
    n = nodes(vm)
    if not (n["top"]["backing_file_depth"] == 1):
        raise AssertionError(n["top"])
    if not (n["top-f"]["drv"] == "file"):
        raise AssertionError(n)
    if not (n["base"]["ro"] is True and n["base.file"]["drv"] == "file"):
        raise AssertionError(n)
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="top")
    qemu_io("-f", "raw", "-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k",
            uri(sock, "top"))
    r = vm.qmp("blockdev-del", node_name="base")
    if not (err(r) == {"class": "GenericError",
                      "desc": "Node 'base' is busy: node is used as backing hd of 'top'"}):
        raise AssertionError(r)
    r = vm.qmp("blockdev-del", node_name="top-f")
    if not (err(r) == {"class": "GenericError", "desc": "Node top-f is not owned by the monitor"}):
        raise AssertionError(r)
    export_del(vm, "e0")
    vm.cmd("blockdev-del", node_name="top")
    # The monitor's backing node stays.
    if not (set(nodes(vm)) == {"base", "base.file"}):
        raise AssertionError(nodes(vm))
    vm.cmd("blockdev-del", node_name="base")
    if not (nodes(vm) == {}):
        raise AssertionError('failed: nodes(vm) == {}')

    vm.cmd("blockdev-add", driver="qcow2", node_name="alone", backing=None,
           file={"driver": "file", "filename": top})
    if not (nodes(vm)["alone"]["backing_file_depth"] == 0):
        raise AssertionError('failed: nodes(vm)["alone"]["backing_file_depth"] == 0')
    vm.cmd("block-export-add", type="nbd", id="e1", node_name="alone")
    qemu_io("-f", "raw", "-r", "-c", "read -P 0 0 64k", "-c", "read -P 0x22 1M 64k",
            uri(sock, "alone"))
    export_del(vm, "e1")
    vm.cmd("blockdev-del", node_name="alone")
    if not (nodes(vm) == {}):
        raise AssertionError('failed: nodes(vm) == {}')
    check(top)
    # Opening without the backing does not change the header.
    if not (info(top)["backing-filename"] == base):
        raise AssertionError(info(top))


def case_null_raw(vm, d):
    """null-co and raw nodes: added, exported, read and written, deleted."""
    img = os.path.join(d, "disk.raw")
    qemu_img("create", "-q", "-f", "raw", img, "1M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", img)
    sock = nbd_start(vm, d)
    vm.cmd("blockdev-add", driver="null-co", node_name="n0", size=MiB, read_zeroes=True)
    vm.cmd("blockdev-add", driver="null-co", node_name="n1")
    vm.cmd("blockdev-add", driver="raw", node_name="r0", file={"driver": "file", "filename": img})
    vm.cmd("blockdev-add", driver="raw", node_name="r1", file="n0")
    n = nodes(vm)
    if not (n["n1"]["drv"] == "null-co" and n["n1"]["image"]["virtual-size"] == 1 << 30):
        raise AssertionError(n["n1"])
    if not (n["n0"]["image"]["virtual-size"] == MiB):
        raise AssertionError(n["n0"])
    if not (n["r0"]["drv"] == "raw" and n["r0"]["file"] == img):
        raise AssertionError(n["r0"])
    if not (n["r0.file"]["drv"] == "file"):
        raise AssertionError(n)
    if not (n["r1"]["drv"] == "raw"):
        raise AssertionError(n["r1"])
    # Raw nodes are nodes, not devices.
    if not (vm.cmd("query-block") == []):
        raise AssertionError(vm.cmd("query-block"))
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True)
    vm.cmd("block-export-add", type="nbd", id="e1", node_name="r1")
    vm.cmd("block-export-add", type="nbd", id="e2", node_name="n0")
    qemu_io("-f", "raw", "-c", "read -P 0x5a 0 64k", "-c", "write -P 0x66 64k 64k",
            uri(sock, "r0"))
    qemu_io("-f", "raw", "-r", "-c", "read -P 0 0 1M", uri(sock, "r1"))
    qemu_io("-f", "raw", "-r", "-c", "read -P 0 512k 64k", uri(sock, "n0"))
    r = vm.qmp("blockdev-del", node_name="n0")
    if not (err(r) == {"class": "GenericError", "desc": "Node n0 is in use"}):
        raise AssertionError(r)
    for e in ("e0", "e1", "e2"):
        export_del(vm, e)
    r = vm.qmp("blockdev-del", node_name="n0")
    if not (err(r) == {"class": "GenericError", "desc": "Block device n0 is in use"}):
        raise AssertionError(r)
    for n in ("r1", "n0", "n1", "r0"):
        vm.cmd("blockdev-del", node_name=n)
    if not (nodes(vm) == {}):
        raise AssertionError(nodes(vm))
    qemu_io("-f", "raw", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0x66 64k 64k", img)


def case_snapshot_config(vm, d):
    """blockdev-snapshot-sync on a blockdev node, then save_config's
    blockdev section, and the overlay streamed and closed."""
    base, top = make_chain(d, ["base", "top"], "4M", [["write -P 0x11 0 1M"], []])
    snap = os.path.join(d, "snap.qcow2")
    vm.cmd("blockdev-add", driver="qcow2", node_name="top",
           file={"driver": "file", "filename": top})
    vm.cmd("blockdev-snapshot-sync", node_name="top", snapshot_file=snap,
           snapshot_node_name="snap", format="qcow2")
    n = nodes(vm)
    if not (n["snap"]["backing_file_depth"] == 2):
        raise AssertionError(n["snap"])
    if not (info(snap)["backing-filename"] == top):
        raise AssertionError(info(snap))
    cfg = vm.cmd("save_config")
    sub = {s["subsystem"]: s["config"] for s in cfg["subsystems"]}
    calls = sub["blockdev"]
    if not ([c["params"]["node-name"] for c in calls] == ["top", "snap"]):
        raise AssertionError(calls)
    if not (all(c["method"] == "blockdev-add" for c in calls)):
        raise AssertionError(calls)
    # Nothing of those nodes is saved twice as bdev_* calls.
    if not (all(c["params"].get("name") not in ("top.file", "snap.file")
               for c in sub.get("bdev", []))):
        raise AssertionError(sub.get("bdev"))
    vm.cmd("block-stream", job_id="s", device="snap")
    vm.wait_until_completed(drive="s")
    vm.cmd("blockdev-del", node_name="snap")
    vm.cmd("blockdev-del", node_name="top")
    if not (nodes(vm) == {}):
        raise AssertionError(nodes(vm))
    check(snap)
    if not ("backing-filename" not in info(snap)):
        raise AssertionError('failed: "backing-filename" not in info(snap)')
    qemu_io("-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 1M 3M", snap)


# --- snapshots of an exported node (QSD / libvirt) ---------------------------

KiB = 1 << 10


def snap_chain(vm, d):
    """base <- top (8 MiB), top added by blockdev-add (chain from the headers),
    exported writable over NBD, a client write; returns (paths, ref, sock)."""
    paths = make_chain(d, ["base", "top"], "8M", [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 1M 2M"],
    ])
    ref = reference(d, paths[-1])
    vm.cmd("blockdev-add", driver="qcow2", node_name="top",
           file={"driver": "file", "filename": paths[-1]})
    sock = nbd_start(vm, d)
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="top", writable=True)
    for img in (uri(sock, "top"), ref):
        qemu_io("-f", "raw", "-c", "write -P 0x44 3M 64k", img)
    return paths, ref, sock


def background_client(u, n=40):
    """One NBD connection writing n 64 KiB blocks from 4 MiB (25 ms apart,
    so it spans the snapshot), then reading every one back."""
    cmds = []
    for i in range(n):
        cmds += ["-c", f"write -P 0x55 {4 * MiB + i * 64 * KiB} 64k", "-c", "sleep 25"]
    cmds += ["-c", f"read -P 0x55 {4 * MiB} {n * 64}k", "-c", "read -P 0x44 3M 64k",
             "-c", "read -P 0x22 1M 64k"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, u],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def background_done(p, ref, n=40):
    out, errs = p.communicate(timeout=60)
    if not (p.returncode == 0):
        raise AssertionError(out + errs)
    if not ("failed" not in out and "error" not in (out + errs).lower()):
        raise AssertionError(out + errs)
    # Every write and the verifying reads went through the one connection.
    if not (out.count("wrote 65536/65536") == n and out.count("read ") == 3):
        raise AssertionError(out)
    qemu_io("-f", "raw", "-c", f"write -P 0x55 {4 * MiB} {n * 64}k", ref)


def exported_moved(vm, sock, ref):
    """The export follows the snapshot: it is on ov, clients carry on and
    write into ov."""
    ex = vm.cmd("query-block-exports")
    if not (ex == [{"type": "nbd", "id": "e0", "node-name": "ov", "shutting-down": False}]):
        raise AssertionError(ex)
    # The export's front door is hidden: no device appears.
    if not (vm.cmd("query-block") == []):
        raise AssertionError(vm.cmd("query-block"))
    for img in (uri(sock, "top"), ref):
        qemu_io("-f", "raw", "-c", "write -P 0x66 7M 64k", img)
    n = nodes(vm)
    if not (n["ov"]["backing_file_depth"] == 2):
        raise AssertionError(n["ov"])
    r = vm.qmp("blockdev-del", node_name="top")
    if not (err(r) == {"class": "GenericError",
                      "desc": "Node 'top' is busy: node is used as backing hd of 'ov'"}):
        raise AssertionError(r)
    r = vm.qmp("blockdev-del", node_name="ov")
    if not (err(r) == {"class": "GenericError", "desc": "Node ov is in use"}):
        raise AssertionError(r)


def case_snapshot_export(vm, d):
    """libvirt's way: qemu-img create the overlay, blockdev-add it with
    backing: null, blockdev-snapshot; the export moves onto it with a client
    writing through the switch; block-stream on the overlay; all closed."""
    paths, ref, sock = snap_chain(vm, d)
    top = paths[-1]
    ov = os.path.join(d, "ov.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", ov)
    vm.cmd("blockdev-add", driver="qcow2", node_name="ov", backing=None,
           file={"driver": "file", "filename": ov})
    bg = background_client(uri(sock, "top"))
    time.sleep(0.3)
    vm.cmd("blockdev-snapshot", node="top", overlay="ov")
    if not (bg.poll() is None):
        raise AssertionError("the client's connection must span the snapshot")
    background_done(bg, ref)
    exported_moved(vm, sock, ref)
    # Written after the switch: in ov (its metadata is on disk as written).
    if not (depth_at(ov, 7 * MiB) == 0):
        raise AssertionError(qmap(ov))
    vm.cmd("block-stream", job_id="s0", device="ov")
    vm.wait_until_completed(drive="s0")
    if not (nodes(vm)["ov"]["backing_file_depth"] == 0):
        raise AssertionError('failed: nodes(vm)["ov"]["backing_file_depth"] == 0')
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock, "top"), ref],
                       capture_output=True, text=True)
    if not (r.returncode == 0):
        raise AssertionError(r.stdout + r.stderr)
    export_del(vm, "e0")
    vm.cmd("blockdev-del", node_name="ov")
    vm.cmd("blockdev-del", node_name="top")
    if not (nodes(vm) == {}):
        raise AssertionError(nodes(vm))
    for p in (ov, top):
        check(p)
    if not ("backing-filename" not in info(ov)):
        raise AssertionError(info(ov))
    compare_raw(ov, ref)
    # Nothing written after the switch reached the old top.
    if not (depth_at(top, 7 * MiB) != 0):
        raise AssertionError(qmap(top))


def case_snapshot_sync_export(vm, d):
    """blockdev-snapshot-sync {node-name} on the exported node: the overlay
    is created and added, the export moves onto it with a client writing
    through the switch; judged after close without a stream."""
    paths, ref, sock = snap_chain(vm, d)
    top = paths[-1]
    ov = os.path.join(d, "ov.qcow2")
    bg = background_client(uri(sock, "top"))
    time.sleep(0.3)
    vm.cmd("blockdev-snapshot-sync", node_name="top", snapshot_file=ov,
           snapshot_node_name="ov", format="qcow2")
    if not (bg.poll() is None):
        raise AssertionError("the client's connection must span the snapshot")
    background_done(bg, ref)
    exported_moved(vm, sock, ref)
    export_del(vm, "e0")
    if not (vm.cmd("query-block-exports") == []):
        raise AssertionError('failed: vm.cmd("query-block-exports") == []')
    vm.cmd("blockdev-del", node_name="ov")
    vm.cmd("blockdev-del", node_name="top")
    if not (nodes(vm) == {}):
        raise AssertionError(nodes(vm))
    for p in (ov, top):
        check(p)
    if not (info(ov)["backing-filename"] == top):
        raise AssertionError(info(ov))
    if not (depth_at(ov, 7 * MiB) == 0):
        raise AssertionError(qmap(ov))
    if not (depth_at(top, 7 * MiB) != 0):
        raise AssertionError(qmap(top))
    compare_raw(ov, ref)


def snapshot_script(d):
    """The libvirt flow's commands whose answers must be QSD's."""
    top, ov, ov2 = (os.path.join(d, f) for f in ("top.qcow2", "ov.qcow2", "ov2.qcow2"))
    file = lambda f: {"driver": "file", "filename": f}  # noqa: E731
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file(top)}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": os.path.join(d, "nbd.sock")}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": None, "file": file(ov)}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov2", "backing": None, "file": file(ov2)}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "ov2"}),
        ("blockdev-snapshot", {"node": "top", "overlay": "ov2"}),
        ("block-export-del", {"id": "e2"}),
        ("wait", "BLOCK_EXPORT_DELETED"),
        ("blockdev-snapshot", {"node": "top", "overlay": "ov"}),
        ("query-block-exports", {}),
        ("blockdev-snapshot", {"node": "top", "overlay": "ov"}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "ov"}),
        ("block-export-del", {"id": "e0"}),
        ("wait", "BLOCK_EXPORT_DELETED"),
        ("query-block-exports", {}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "ov"}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "ov2"}),
        ("query-named-block-nodes", {}),
    ]


def case_snapshot_qsd(vm, d):
    """The libvirt flow's answers (query-block-exports after the move, the
    refusals of blockdev-del and blockdev-snapshot) are QSD's."""
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        os.mkdir(sub)
        paths = make_chain(sub, ["base", "top"], "4M", [["write -P 0x11 0 1M"], []])
        for o in ("ov", "ov2"):
            qemu_img("create", "-q", "-f", "qcow2", "-b", paths[-1], "-F", "qcow2",
                     os.path.join(sub, f"{o}.qcow2"))
        script = snapshot_script(sub)
        runs[who] = qsd_answers(sub, script) if who == "qsd" else run_script(vm, script)
        for p in paths:
            check(p)
    for g, w in zip(runs["sluice"], runs["qsd"]):
        # The arguments differ only by the directory.
        if not ((g[0], g[2]) == (w[0], w[2])):
            raise AssertionError(f"\nsluice: {g}\nqsd:    {w}")
    if not (len(runs["sluice"]) == len(runs["qsd"])):
        raise AssertionError('failed: len(runs["sluice"]) == len(runs["qsd"])')


# --- errors, compared with qemu-storage-daemon ------------------------------

def error_script(d):
    """(command, arguments) pairs; files in d. Each must end the same on both."""
    top, other, base = (os.path.join(d, f) for f in ("top.qcow2", "other.qcow2", "base.qcow2"))
    missing = os.path.join(d, "missing.qcow2")
    f = {"driver": "file", "filename": top}
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": top}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f1"}),
        ("blockdev-add", {"driver": "file", "node-name": "fro", "filename": base, "read-only": True}),
        ("blockdev-add", {"driver": "nope", "node-name": "x"}),
        ("blockdev-add", {"node-name": "x"}),
        ("blockdev-add", {"driver": "qcow2", "file": f}),
        ("blockdev-add", {"driver": "file", "node-name": "x", "filename": missing}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x",
                          "file": {"driver": "file", "filename": missing}}),
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": base}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x",
                          "file": {"driver": "file", "filename": other, "node-name": "f1"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x",
                          "file": {"driver": "file", "filename": other, "node-name": "x"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "nosuch"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": 5}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "read-only": "yes"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "backing": 5}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "cache": {"direct": "x"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "cache": {"bogus": True}}),
        ("blockdev-add", {"driver": "null-co", "node-name": "x", "size": "x"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "detect-zeroes": "bad"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "bogus": 1}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": dict(f, bogus=1)}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": {"driver": "file"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "1bad", "file": "f1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a" * 40, "file": "f1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1", "backing": "nosuch"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "fro"}),
        ("blockdev-del", {"node-name": "nosuch"}),
        ("blockdev-del", {}),
        ("blockdev-del", {"node-name": "f1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q2",
                          "file": {"driver": "file", "filename": other, "node-name": "n.1"}}),
        ("blockdev-del", {"node-name": "n.1"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": os.path.join(d, "nbd.sock")}}}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q1"}),
        ("blockdev-del", {"node-name": "q1"}),
        ("block-export-del", {"id": "e1"}),
        ("wait", "BLOCK_EXPORT_DELETED"),
        ("block-stream", {"job-id": "j", "device": "q2", "speed": 1}),
        ("blockdev-del", {"node-name": "q2"}),
        ("block-job-cancel", {"device": "j"}),
        ("wait", "BLOCK_JOB_CANCELLED"),
        ("blockdev-del", {"node-name": "q2"}),
        ("blockdev-del", {"node-name": "q1"}),
        ("blockdev-del", {"node-name": "f1"}),
        ("blockdev-del", {"node-name": "fro"}),
        ("blockdev-del", {"node-name": "f1"}),
        ("query-named-block-nodes", {}),
    ]


def run_script(vm, script):
    out = []
    for cmd, args in script:
        if cmd == "wait":
            vm.event_wait(args, 20)
            continue
        r = vm.raw(cmd, args)
        if "error" in r:
            out.append((cmd, args, r["error"]))
        elif cmd == "query-named-block-nodes":
            out.append((cmd, args, sorted(n["node-name"] for n in r["return"])))
        elif cmd == "query-block-exports":
            out.append((cmd, args, r["return"]))
        else:
            out.append((cmd, args, "ok"))
    return out


def qsd_answers(d, script):
    with qsd_monitor(d) as qsd:
        return run_script(qsd, script)


def jsonrpc(path, method, params):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode())
    buf = b""
    while True:
        buf += s.recv(65536)
        try:
            return json.loads(buf)
        except ValueError:
            continue


def case_errors(vm, d, rpc):
    make_chain(d, ["base", "top"], "8M", [["write -P 0x11 0 8M"], []])
    make_chain(d, ["base", "other"], "8M", [["write -P 0x11 0 8M"], []])
    script = error_script(d)
    want = qsd_answers(d, script)
    got = run_script(vm, script)
    if not (len(got) == len(want)):
        raise AssertionError('failed: len(got) == len(want)')
    for g, w in zip(got, want):
        if not (g == w):
            raise AssertionError(f"\nsluice: {g}\nqsd:    {w}")
    # Every refusal is a GenericError, as QEMU gives it; something was refused.
    if not (sum(1 for g in got if g[2] != "ok" and isinstance(g[2], dict)) >= 30):
        raise AssertionError('failed: sum(1 for g in got if g[2] != "ok" and isinstance(g[2], dict)) >= 30')
    # The same method through the JSON-RPC socket.
    r = jsonrpc(rpc, "blockdev-del", {"node-name": "nosuch"})
    if not (r["error"]["message"] == "Failed to find node with node-name='nosuch'"):
        raise AssertionError(r)
    r = jsonrpc(rpc, "blockdev-add", {"driver": "null-co", "node-name": "j0", "size": 4096})
    if not (r["result"] == {}):
        raise AssertionError(r)
    r = jsonrpc(rpc, "blockdev-add", {"driver": "null-co", "node-name": "j0"})
    if not (r["error"]["message"] == "Duplicate nodes with node-name='j0'"):
        raise AssertionError(r)
    if not (jsonrpc(rpc, "blockdev-del", {"node-name": "j0"})["result"] == {}):
        raise AssertionError('failed: jsonrpc(rpc, "blockdev-del", {"node-name": "j0"})["result"] == {}')
    for p in ("top", "other"):
        check(os.path.join(d, f"{p}.qcow2"))


def main():
    a = parse_args()
    vm = Vm(a.qmp)
    if a.case == "errors":
        case_errors(vm, a.dir, a.rpc)
    else:
        globals()["case_" + a.case](vm, a.dir)
    print("ok")


main()

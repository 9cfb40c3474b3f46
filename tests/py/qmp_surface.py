"""QMP surface commands (block_resize, transaction, query-named-block-nodes
flat), each conversation run on qemu-storage-daemon 10 and on sluice and
compared step by step (replies, refusals with class and message); the
images judged by qemu-img check / info / compare afterwards."""

import json
import os
import shutil
import subprocess
import time

from stream_common import parse_args, qemu_img, qemu_io, qsd_monitor, run_case
from qmp_script import scrub

MiB = 1 << 20
GiB = 1 << 30


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def file(p):
    return {"driver": "file", "filename": p}





def answer(r):
    if "error" in r:
        return ("error", r["error"]["class"], r["error"]["desc"])
    return ("ok", r["return"])


def lock_probe(path):
    """Whether another process may open the image for reading and for
    writing now (the image locks the daemon holds), as qemu-io says."""
    out = []
    for ro in (True, False):
        r = subprocess.run(["qemu-io", *(["-r"] if ro else []), "-c", "quit", path],
                           capture_output=True, text=True)
        out.append("ok" if r.returncode == 0 else "locked" if "lock" in r.stderr else r.stderr.strip())
    return out


def run_script(vm, d, steps, view=None):
    """Runs (command, arguments) steps; returns what each answered, with the
    directory scrubbed; `view(cmd, reply)` may reduce a reply. A step
    ("lock-probe", path) records the image locks on `path` instead."""
    out = []
    for cmd, args in steps:
        if cmd == "lock-probe":
            out.append(scrub((cmd, args, lock_probe(args)), d))
            continue
        r = vm.raw(cmd, args)
        a = answer(r)
        if view and a[0] == "ok":
            a = view(cmd, a)
        out.append(scrub((cmd, args, a), d))
    return out


def compare_runs(runs):
    for i, (g, w) in enumerate(zip(runs["sluice"], runs["qsd"])):
        expect(g == w, f"step {i}:\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), "lengths differ")


def both(vm, d, prepare, script, view=None):
    """Prepares a fresh directory for each daemon, runs the script on QSD then
    on sluice, compares; returns the two directories."""
    runs, dirs = {}, {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        shutil.rmtree(sub, ignore_errors=True)
        os.makedirs(sub)
        prepare(sub)
        dirs[who] = sub
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = run_script(qsd, sub, script(sub), view)
        else:
            runs[who] = run_script(vm, sub, script(sub), view)
            # leave sluice's graph empty for the next case
    compare_runs(runs)
    return dirs


def img_info(p):
    return json.loads(qemu_img("info", "-U", "--output=json", p))


def check_clean(p):
    r = subprocess.run(["qemu-img", "check", "-U", p], capture_output=True, text=True)
    expect(r.returncode == 0, f"qemu-img check {p}: {r.stdout}{r.stderr}")


def same_content(a, b):
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    expect(r.returncode == 0, f"qemu-img compare {a} {b}: {r.stdout}{r.stderr}")


# ---------------------------------------------------------------- block_resize

def resize_prepare(d):
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "a.qcow2"), "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", os.path.join(d, "a.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "base.qcow2"), "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 0 1M", os.path.join(d, "base.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.join(d, "base.qcow2"), "-F", "qcow2",
             os.path.join(d, "top.qcow2"), "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x55 0 256k", os.path.join(d, "top.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", os.path.join(d, "v2.qcow2"), "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x66 0 4M", os.path.join(d, "v2.qcow2"))
    with open(os.path.join(d, "r.raw"), "wb") as f:
        f.truncate(MiB)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "jb.qcow2"), "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 4M", os.path.join(d, "jb.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.join(d, "jb.qcow2"), "-F", "qcow2",
             os.path.join(d, "jt.qcow2"), "4M")


def resize_script(d):
    r = lambda **kw: ("block_resize", {k.replace("_", "-"): v for k, v in kw.items()})  # noqa: E731
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": file(f"{d}/a.qcow2")}),
        ("blockdev-add", {"driver": "file", "node-name": "rf", "filename": f"{d}/r.raw"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": MiB}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": file(f"{d}/base.qcow2"),
                          "backing": None}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file(f"{d}/top.qcow2"),
                          "backing": "base"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "v2", "file": file(f"{d}/v2.qcow2")}),
        # refusals
        r(node_name="q", size=MiB + 3),
        r(node_name="q", size=-1),
        r(node_name="n", size=4 * MiB),
        r(device="nosuch", size=4 * MiB),
        r(node_name="nosuch", size=4 * MiB),
        ("block_resize", {"size": 4 * MiB}),
        ("block_resize", {"node-name": "q"}),
        r(node_name="q", size=4 * MiB, bogus=1),
        r(node_name="base", size=4 * MiB),
        r(node_name="q", size=1 << 60),
        r(node_name="q", size=1 << 55),
        r(node_name="q", size=(1 << 63) - 512),
        r(node_name="rf", size=1 << 60),
        r(node_name="rf", size=(1 << 63) - 512),
        # grows: within the L1 table, then past it (a new L1 table)
        r(node_name="q", size=4 * MiB),
        r(device="q", node_name="q", size=8 * MiB),
        r(node_name="q", size=3 * GiB),
        r(node_name="top", size=2 * MiB),
        r(node_name="rf", size=4 * MiB),
        r(node_name="rf", size=2 * MiB),
        r(node_name="q", size=3 * GiB),
        # shrinks: past the data, into it, to nothing; then growing again
        # reads zeroes where the cut clusters were (and where a longer
        # backing file would show through)
        r(node_name="q", size=2 * MiB),
        r(node_name="q", size=512 * 1024 + 512),
        r(node_name="top", size=128 * 1024),
        r(node_name="top", size=4 * MiB),
        r(node_name="v2", size=1536 * 1024),
        r(node_name="v2", size=0),
        r(node_name="v2", size=3 * MiB),
        r(node_name="q", size=3 * MiB),
        ("query-named-block-nodes", {}),
        # a node a job uses cannot change size (QEMU's op blocker); the
        # stream has 4 MiB to copy at 1 byte/s, so it is still running
        ("blockdev-add", {"driver": "qcow2", "node-name": "jb", "file": file(f"{d}/jb.qcow2"),
                          "backing": None}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "jt", "file": file(f"{d}/jt.qcow2"),
                          "backing": "jb"}),
        ("block-stream", {"device": "jt", "job-id": "s", "speed": 1}),
        r(node_name="jt", size=8 * MiB),
        r(node_name="jb", size=8 * MiB),
        ("block-job-cancel", {"device": "s", "force": True}),
    ]


def resize_view(cmd, a):
    if cmd == "query-named-block-nodes":
        return ("ok", sorted((n["node-name"], n["image"]["virtual-size"]) for n in a[1]
                             if n["node-name"] in ("q", "top", "base", "rf", "v2")))
    return a


def case_resize(vm, d):
    dirs = both(vm, d, resize_prepare, resize_script, resize_view)
    deadline = time.time() + 30
    while vm.rcmd("query-jobs") and time.time() < deadline:
        time.sleep(0.05)
    for n in ("top", "base", "q", "rf", "n", "v2", "jt", "jb"):
        vm.raw("blockdev-del", {"node-name": n})
    for name in ("a.qcow2", "top.qcow2", "v2.qcow2"):
        q, s = (os.path.join(dirs[w], name) for w in ("qsd", "sluice"))
        check_clean(s)
        expect(img_info(s)["virtual-size"] == img_info(q)["virtual-size"],
               f"{name}: sluice {img_info(s)['virtual-size']} qsd {img_info(q)['virtual-size']}")
        same_content(q, s)
    # What was kept is still there; the clusters cut read zeroes (the rest of
    # the cluster the end fell in keeps its bytes, in QEMU's image too).
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x11 0 512k", "-c", "read -P 0 576k 2496k",
            os.path.join(dirs["sluice"], "a.qcow2"))
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x55 0 128k", "-c", "read -P 0 128k 3968k",
            os.path.join(dirs["sluice"], "top.qcow2"))
    expect(os.path.getsize(os.path.join(dirs["sluice"], "r.raw")) == 2 * MiB, "r.raw length")

    # sluice alone: a named device over an image sees the new size, and so
    # does a new NBD connection to its export; writes past the old end land.
    p = os.path.join(d, "dev.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    vm.rcmd("bdev_qcow2_open", {"name": "dev0", "node_name": "dev0-n", "filename": p})
    vm.rcmd("block_resize", {"device": "dev0", "size": 4 * MiB})
    b = vm.rcmd("bdev_get_bdevs", {"name": "dev0"})[0]
    expect(b["num_blocks"] * b["block_size"] == 4 * MiB, f"device size after resize: {b}")
    sock = os.path.join(d, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "dev0", "writable": True})
    uri = f"nbd+unix:///dev0?socket={sock}"
    size = int(subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                              check=True).stdout)
    expect(size == 4 * MiB, f"export size {size}")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 3M 1M", uri)
    # Shrinking the device cuts what the export wrote past the new end.
    vm.rcmd("block_resize", {"device": "dev0", "size": 3 * MiB + 512 * 1024})
    size = int(subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                              check=True).stdout)
    expect(size == 3 * MiB + 512 * 1024, f"export size after the shrink {size}")
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.rcmd("nbd-server-stop", {})
    vm.rcmd("bdev_qcow2_delete", {"name": "dev0"})
    check_clean(p)
    expect(img_info(p)["virtual-size"] == 3 * MiB + 512 * 1024, "dev.qcow2 size")
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x5a 3M 512k", "-c", "read -P 0 0 3M", p)


# ----------------------------------------------------------------- transaction

def txn_prepare(d):
    for n, pat in (("a", 0x11), ("b", 0x22)):
        p = os.path.join(d, f"{n}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", p, "1M")
        qemu_io("-f", "qcow2", "-c", f"write -P {pat} 0 512k", p)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "ov.qcow2"), "1M")


def sync(node, f, name):
    return {"type": "blockdev-snapshot-sync",
            "data": {"node-name": node, "snapshot-file": f, "snapshot-node-name": name, "format": "qcow2"}}


def snap(node, overlay):
    return {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}


ABORT = {"type": "abort", "data": {}}


def txn_script(d):
    t = lambda *acts, **kw: ("transaction", {"actions": list(acts), **kw})  # noqa: E731
    state = [("query-named-block-nodes", {}), ("query-block-exports", {}),
             ("lock-probe", f"{d}/a.qcow2"), ("lock-probe", f"{d}/b.qcow2"), ("lock-probe", f"{d}/ov.qcow2")]
    a1, a2 = f"{d}/a1.qcow2", f"{d}/a2.qcow2"
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": file(f"{d}/a.qcow2")}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "b", "file": file(f"{d}/b.qcow2")}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": file(f"{d}/ov.qcow2"),
                          "backing": None}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/nbd.sock"}}}),
        ("block-export-add", {"type": "nbd", "id": "eb", "node-name": "b", "writable": True}),
        # (QEMU frees a snapshot-sync overlay nothing uses: export the node.)
        ("block-export-add", {"type": "nbd", "id": "ea", "node-name": "a", "writable": True}),
        *state,
        # refusals of the request itself
        ("transaction", {}),
        ("transaction", {"actions": "x"}),
        ("transaction", {"actions": ["x"]}),
        ("transaction", {"actions": [{"type": 1, "data": {}}]}),
        ("transaction", {"actions": [{"type": "bogus", "data": {}}]}),
        ("transaction", {"actions": [{"data": {}}]}),
        ("transaction", {"actions": [{"type": "abort"}]}),
        ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]}),
        ("transaction", {"actions": [{"type": "abort", "data": {}, "x": 1}]}),
        ("transaction", {"actions": [], "bogus": 1}),
        t(sync("a", a1, "a1"), properties={"completion-mode": "grouped"}),
        t(ABORT, properties={"completion-mode": "grouped"}),
        t(sync("a", a1, "a1"), properties={"completion-mode": "bogus"}),
        t(sync("a", a1, "a1"), properties={"bogus": 1}),
        t(sync("a", a1, "a1"), properties=1),
        t({"type": "blockdev-snapshot-sync", "data": {"node-name": "a"}}),
        t(snap("b", "ov"), {"type": "blockdev-snapshot", "data": {"node": "b"}}),
        t(),
        t(properties={"completion-mode": "grouped"}),
        t(ABORT),
        # the last action fails: every earlier one is undone
        t(sync("a", a1, "a1"), ABORT),
        *state,
        t(snap("b", "ov"), sync("a", a1, "a1"), sync("a1", a1, "a2")),
        *state,
        t(snap("b", "ov"), sync("a", a1, "a1"), snap("b", "ov")),
        *state,
        t(sync("a", a1, "a1"), sync("a", a2, "a2")),
        t(snap("b", "ov"), sync("nosuch", a2, "x")),
        t(snap("b", "ov"), snap("nosuch", "ov")),
        t(snap("b", "nosuch")),
        *state,
        # all of it
        t(snap("b", "ov"), sync("a", a1, "a1"), properties={"completion-mode": "individual"}),
        *state,
        ("block-export-del", {"id": "eb"}),
        ("block-export-del", {"id": "ea"}),
    ]


def txn_view(cmd, a):
    # Left out, as sluice differs from QEMU there outside transactions too:
    # the backing file name an existing overlay's header gets (QEMU leaves
    # the header alone).
    if cmd == "query-named-block-nodes":
        return ("ok", sorted((n["node-name"], n["ro"], n["backing_file_depth"],
                              n["image"].get("backing-image", {}).get("filename"))
                             for n in a[1] if not n["node-name"].startswith("#")
                             and n["drv"] != "file"))
    if cmd == "query-block-exports":
        return ("ok", sorted((e["id"], e["node-name"]) for e in a[1]))
    return a


def case_transaction(vm, d):
    dirs = both(vm, d, txn_prepare, txn_script, txn_view)
    vm.raw("nbd-server-stop", {})
    for n in ("a1", "ov", "a", "b"):
        vm.raw("blockdev-del", {"node-name": n})
    vm.raw("nbd-server-stop", {})
    for name in ("a.qcow2", "b.qcow2", "ov.qcow2", "a1.qcow2"):
        q, s = (os.path.join(dirs[w], name) for w in ("qsd", "sluice"))
        check_clean(s)
        if name != "ov.qcow2":
            expect(img_info(s).get("backing-filename", "").replace(dirs["sluice"], "D")
                   == img_info(q).get("backing-filename", "").replace(dirs["qsd"], "D"),
                   f"{name}: backing files differ: {img_info(s)} {img_info(q)}")
        if name not in ("ov.qcow2", "a1.qcow2"):
            same_content(q, s)
    same_content(os.path.join(dirs["sluice"], "a1.qcow2"), os.path.join(dirs["qsd"], "a.qcow2"))
    # Files the failed transactions created stay, as QEMU leaves them.
    expect(os.path.exists(os.path.join(dirs["qsd"], "a2.qcow2"))
           == os.path.exists(os.path.join(dirs["sluice"], "a2.qcow2")), "a2.qcow2 left behind differently")


def case_transaction_device(vm, d):
    """sluice alone (QSD has no devices): snapshots of a named device in a
    transaction whose last action fails leave the device on its image, no
    overlay node, the image's locks as before, and I/O through its export
    landing in the image; the same transaction without the abort moves it."""
    p = os.path.join(d, "dev.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 4M", p)
    vm.rcmd("bdev_qcow2_open", {"name": "dev0", "node_name": "dev0-n", "filename": p})
    sock = os.path.join(d, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "dev0", "writable": True})
    uri = f"nbd+unix:///dev0?socket={sock}"

    def snap_sync(f, n):
        return {"type": "blockdev-snapshot-sync",
                "data": {"device": "dev0", "snapshot-file": f, "snapshot-node-name": n}}

    def names():
        return sorted(b["name"] for b in vm.rcmd("bdev_get_bdevs"))

    before_nodes, before_locks = names(), lock_probe(p)
    s1, s2 = os.path.join(d, "s1.qcow2"), os.path.join(d, "s2.qcow2")
    r = vm.raw("transaction", {"actions": [snap_sync(s1, "s1"), ABORT]})
    expect(r.get("error", {}).get("desc") == "Transaction aborted using Abort action", f"{r}")
    r = vm.raw("transaction", {"actions": [snap_sync(s1, "s1"), snap_sync(s2, "s1")]})
    expect("error" in r, f"a duplicate node name must fail: {r}")
    expect(names() == before_nodes, f"nodes after the failed transactions: {names()} vs {before_nodes}")
    expect(lock_probe(p) == before_locks, f"locks: {lock_probe(p)} vs {before_locks}")
    qemu_io("-f", "raw", "-c", "write -P 0x22 1M 1M", uri)
    # The same without the abort: the device moves onto s1.
    vm.rcmd("transaction", {"actions": [snap_sync(s1, "s1")]})
    qemu_io("-f", "raw", "-c", "write -P 0x33 2M 1M", uri)
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.rcmd("nbd-server-stop", {})
    vm.rcmd("bdev_qcow2_delete", {"name": "dev0"})
    check_clean(p)
    check_clean(s1)
    # dev.qcow2 got the write made after the failed transactions, not the later one.
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
            "-c", "read -P 0x11 2M 2M", p)
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x22 1M 1M", s1)


def case_null_resize(vm, d):
    """SPDK's bdev_null_resize through SPDK's own client: a null bdev grows
    (size in MiB), a smaller size and an unknown name refused with SPDK's
    codes; an export made before the growth serves the new end to a new
    connection; QMP's block_resize refuses it as QEMU's null-co driver does."""
    from spdk.rpc.client import JSONRPCClient, JSONRPCException
    c = JSONRPCClient(parse_args().rpc)
    c.call("bdev_null_create", {"name": "nl0", "num_blocks": 2048, "block_size": 512})
    sock = os.path.join(d, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "nl0"})
    expect(c.call("bdev_null_resize", {"name": "nl0", "new_size": 4}) is True, "resize answer")
    b = c.call("bdev_get_bdevs", {"name": "nl0"})[0]
    expect(b["num_blocks"] == 8192, f"num_blocks after the resize: {b}")
    for args, code in (({"name": "nl0", "new_size": 2}, -22), ({"name": "nosuch", "new_size": 8}, -19)):
        try:
            c.call("bdev_null_resize", args)
            raise Mismatch(f"bdev_null_resize {args} succeeded")
        except JSONRPCException as e:
            expect(f"'code': {code}" in str(e) or f'"code": {code}' in str(e), f"{args}: {e}")
    uri = f"nbd+unix:///nl0?socket={sock}"
    size = int(subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, check=True).stdout)
    expect(size == 4 * MiB, f"export size {size}")
    qemu_io("-f", "raw", "-r", "-c", "read -P 0 3M 1M", uri)
    # QMP: the export does not share `resize` (as QEMU's), and without it
    # the driver cannot (as QEMU's null-co).
    r = vm.raw("block_resize", {"node-name": "nl0", "size": 8 * MiB})
    expect("Permission conflict on node 'nl0'" in r.get("error", {}).get("desc", ""), f"{r}")
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.rcmd("nbd-server-stop", {})
    time.sleep(0.2)  # the export goes once its clients have
    r = vm.raw("block_resize", {"node-name": "nl0", "size": 8 * MiB})
    expect(r.get("error", {}).get("desc") == "Image format driver does not support resize", f"{r}")
    c.call("bdev_null_delete", {"name": "nl0"})


# ------------------------------------------------------ query-named-block-nodes

def nodes_prepare(d):
    qemu_img("create", "-q", "-f", "qcow2", f"{d}/base.qcow2", "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 64k", f"{d}/base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", f"{d}/base.qcow2", "-F", "qcow2", f"{d}/top.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", f"{d}/ro.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", f"{d}/v2.qcow2", "2M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd,refcount_bits=8", f"{d}/z.qcow2", "1M")
    for n in ("r", "f", "fd", "fro"):
        with open(f"{d}/{n}.raw", "wb") as f:
            f.truncate(MiB)


def nodes_script(d):
    def F(p, **kw):
        return {"driver": "file", "filename": f"{d}/{p}", **kw}
    adds = [
        {"driver": "qcow2", "node-name": "base", "file": F("base.qcow2"), "backing": None},
        {"driver": "qcow2", "node-name": "top", "file": F("top.qcow2"), "backing": "base"},
        {"driver": "qcow2", "node-name": "ro", "read-only": True, "file": F("ro.qcow2")},
        {"driver": "qcow2", "node-name": "v2", "file": F("v2.qcow2")},
        {"driver": "qcow2", "node-name": "z", "file": F("z.qcow2")},
        {"driver": "raw", "node-name": "r", "file": F("r.raw")},
        {"driver": "file", "node-name": "f", "filename": f"{d}/f.raw"},
        {"driver": "file", "node-name": "fd", "filename": f"{d}/fd.raw", "cache": {"direct": True}},
        {"driver": "file", "node-name": "fro", "filename": f"{d}/fro.raw", "read-only": True},
        {"driver": "null-co", "node-name": "n", "size": MiB},
    ]
    return [("blockdev-add", a) for a in adds] + [
        ("query-named-block-nodes", {}),
        ("query-named-block-nodes", {"flat": True}),
        ("query-named-block-nodes", {"flat": False}),
        ("query-named-block-nodes", {"flat": 1}),
        ("query-named-block-nodes", {"bogus": 1}),
    ]


NAMED = {"base", "top", "ro", "v2", "z", "r", "f", "fd", "fro", "n"}


def nodes_view(cmd, a):
    # Anonymous nodes are named differently (QEMU's #blockNNN); each
    # named node's whole BlockDeviceInfo is compared.
    if cmd == "query-named-block-nodes":
        return ("ok", sorted((n for n in a[1] if n["node-name"] in NAMED), key=lambda n: n["node-name"]))
    return a


def case_named_nodes(vm, d):
    both(vm, d, nodes_prepare, nodes_script, nodes_view)
    for n in ("top", "base", "ro", "v2", "z", "r", "f", "fd", "fro", "n"):
        vm.rcmd("blockdev-del", {"node-name": n})


# ------------------------------------------------------------ query-qmp-schema

PROBE = {"x-schema-probe": True}


def unexpected(desc, member):
    return f"'{member}' is unexpected" in desc or f"unknown field `{member}`" in desc


def case_schema(vm, d):
    """The schema is true of the binary: the same commands as
    query-commands, every listed argument accepted, an unlisted one refused,
    every referenced type defined; and qemu.qmp's async client reads it as
    libvirt does (a command's argument looked up through its arg-type)."""
    schema = vm.rcmd("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    expect(len(by_name) == len(schema), "duplicate schema names")
    cmds = {e["name"] for e in schema if e["meta-type"] == "command"}
    served = {c["name"] for c in vm.rcmd("query-commands")}
    expect(cmds == served, f"schema only: {sorted(cmds - served)}; served only: {sorted(served - cmds)}")
    for e in schema:
        for k in ("arg-type", "ret-type", "element-type"):
            if k in e:
                expect(e[k] in by_name, f"{e['name']}: {k} {e[k]} undefined")
        for m in e.get("members", []):
            if "type" in m:
                expect(m["type"] in by_name, f"{e['name']}.{m.get('name')}: type {m['type']} undefined")
    checked = refused = 0
    for c in sorted(cmds):
        e = by_name[c]
        if "sluice-params" in e.get("features", []):
            continue
        arg = by_name[e["arg-type"]]
        if "variants" in arg:
            continue  # unions (blockdev-add, ...): compared with QSD elsewhere
        for m in arg.get("members", []):
            r = vm.raw(c, {m["name"]: PROBE})
            expect(not unexpected(r.get("error", {}).get("desc", ""), m["name"]),
                   f"{c}: listed argument {m['name']} refused as unknown: {r}")
            checked += 1
        if c in ("quit", "qmp_capabilities"):  # the session answers these itself
            continue
        # The required arguments with values of their type (names of
        # nothing), so that only the unlisted one is wrong.
        args, ok = {"x-unlisted": 1}, True
        for m in arg.get("members", []):
            if "default" in m:
                continue
            v = {"str": "x-nothing", "int": 0, "bool": False}.get(m["type"])
            ok = ok and v is not None
            args[m["name"]] = v
        if not ok:
            continue
        r = vm.raw(c, args)
        expect("error" in r and unexpected(r["error"]["desc"], "x-unlisted"),
               f"{c}: an unlisted argument was not refused: {r}")
        refused += 1
    expect(checked > 30 and refused > 20, f"only {checked} arguments checked, {refused} refusals")
    # Events: those sluice sends are listed (every event published in the
    # sources is checked by rpc's unit test); QEMU's job events at least.
    events = {e["name"] for e in schema if e["meta-type"] == "event"}
    for ev in ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_READY", "BLOCK_EXPORT_DELETED"):
        expect(ev in events, f"event {ev} missing")
    # qemu.qmp's async client, probing as libvirt's virQEMUQAPISchema does.
    import asyncio
    from qemu.qmp import QMPClient

    async def probe():
        q = QMPClient("schema-probe")
        await q.connect(vm_sock)
        try:
            s = await q.execute("query-qmp-schema")
        finally:
            await q.disconnect()
        idx = {e["name"]: e for e in s}

        def arg_member(cmd, name):
            if cmd not in idx:
                return None
            return next((m for m in idx[idx[cmd]["arg-type"]].get("members", []) if m["name"] == name), None)

        expect(arg_member("block_resize", "node-name") is not None, "block_resize node-name")
        expect(arg_member("blockdev-snapshot-sync", "snapshot-node-name") is not None,
               "blockdev-snapshot-sync snapshot-node-name")
        expect(arg_member("query-named-block-nodes", "flat") is not None, "query-named-block-nodes flat")
        # transaction's action kinds: libvirt looks for blockdev-snapshot here.
        acts = idx[arg_member("transaction", "actions")["type"]]
        union = idx[acts["element-type"]]
        tag = next(m for m in union["members"] if m["name"] == union["tag"])
        expect("blockdev-snapshot" in idx[tag["type"]]["values"], "transaction blockdev-snapshot")
        # libvirt probes the mirror's copy-mode before it asks for write-blocking.
        expect(arg_member("blockdev-mirror", "copy-mode") is not None, "blockdev-mirror copy-mode")
        # Not served, so not there (libvirt then falls back).
        expect(arg_member("blockdev-backup", "sync") is None, "blockdev-backup is not served")
    vm_sock = parse_args().qmp
    asyncio.run(probe())


if __name__ == "__main__":
    run_case(globals())

"""The backing file name and format a stream writes into the top image's header,
for every kind of node sluice has as the stream's base, given by `base` (its
filename) and by `bottom`: byte for byte what qemu-storage-daemon 10 writes for
the same chain where QEMU has the node kind, and a name that reopens (or
refuses clearly) where only sluice has it.

Phases, with the daemon restarted between them by the Rust test:
  stream  streams every case on sluice (and on QSD first, for the expected header)
  judge   with sluice stopped: qemu-img info --backing-chain, check, compare
  reopen  a fresh sluice opens every top from its header and serves it over NBD
"""

import argparse
import json
import os
import subprocess

from stream_common import Vm, qsd_monitor

MiB = 1 << 20
SIZE = MiB


class OracleError(Exception):
    """A behaviour differs from what the test expects."""


def need(cond, msg):
    if not cond:
        raise OracleError(msg)


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


def ok(*args):
    r = run(*args)
    need(r.returncode == 0, f"{' '.join(map(str, args))}: rc {r.returncode}: {r.stdout}{r.stderr}")
    return r.stdout


# name -> (QEMU has it, how B is made, reads as the reference where streamed)
#   B is made with blockdev-add (a dict) or a sluice method [method, params].
LOOP = None  # a loop device holding the base pattern (--loop), for host_device


def kinds(d):
    raw = os.path.join(d, "base.raw")
    qcow = os.path.join(d, "base.qcow2")
    loop = {}
    if LOOP:
        # Read-only: the two daemons open it one after the other while sluice keeps its node.
        loop["host_device"] = (True, {"driver": "host_device", "filename": LOOP, "read-only": True}, True)
    return {
        **loop,
        "file": (True, {"driver": "file", "filename": raw}, True),
        "raw": (True, {"driver": "raw", "file": {"driver": "file", "filename": raw}}, True),
        "raw-null": (True, {"driver": "raw", "file": {"driver": "null-co", "size": SIZE, "read-zeroes": True}}, True),
        "null-co": (True, {"driver": "null-co", "size": SIZE, "read-zeroes": True}, True),
        # No read-zeroes: what reads through to it is unspecified; header and reopen only.
        "null-co-size": (True, {"driver": "null-co", "size": SIZE}, False),
        "null-co-default": (True, {"driver": "null-co"}, False),
        "qcow2": (True, {"driver": "qcow2", "file": {"driver": "file", "filename": qcow}}, True),
        "aio": (False, ["bdev_aio_create", {"filename": raw}], True),
        "null": (False, ["bdev_null_create", {"num_blocks": SIZE // 512, "block_size": 512}], True),
        "malloc": (False, ["bdev_malloc_create", {"num_blocks": SIZE // 512, "block_size": 512}], False),
    }


# What sluice writes for the kinds QEMU lacks.
SLUICE_ONLY = {
    "aio": (lambda d: os.path.join(d, "base.raw"), "raw"),
    "null": (lambda d: f'json:{{"read-zeroes": true, "driver": "null-co", "size": {SIZE}}}', "null-co"),
    "malloc": (lambda d: f'json:{{"driver": "malloc", "size": {SIZE}}}', "malloc"),
}

# "mask": `bottom` with backing-mask-protocol (a protocol node's format is written as raw).
# "direct": `base-node` the top's own backing (nothing to copy; QEMU still
# rewrites the header).
HOWS = ["base", "bottom", "mask", "direct"]


def cases(root):
    for kind in kinds(root):
        for how in HOWS:
            yield kind, how, os.path.join(root, f"{kind}-{how}")


def images(d, kind, how=None):
    """Fresh images: base (pattern 0x11 in the first 256 KiB), mid (0x22 in
    the next 256 KiB) over it, top (0x33 in the next 128 KiB) over mid; the
    reference of what the top reads."""
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    raw, qcow = os.path.join(d, "base.raw"), os.path.join(d, "base.qcow2")
    mid, top = os.path.join(d, "mid.qcow2"), os.path.join(d, "top.qcow2")
    ref = os.path.join(d, "ref.raw")
    ok("qemu-img", "create", "-q", "-f", "raw", raw, SIZE)
    ok("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 256k", raw)
    ok("qemu-img", "create", "-q", "-f", "qcow2", qcow, SIZE)
    ok("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 256k", qcow)
    # No backing in the headers: the chain is bound by node names.
    ok("qemu-img", "create", "-q", "-f", "qcow2", mid, SIZE)
    ok("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 256k 256k", mid)
    ok("qemu-img", "create", "-q", "-f", "qcow2", top, SIZE)
    ok("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 512k 128k", top)
    ok("qemu-img", "create", "-q", "-f", "raw", ref, SIZE)
    base_has_data = kind in ("file", "raw", "qcow2", "aio", "host_device")
    if base_has_data:
        ok("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 256k", ref)
    if how != "direct":
        ok("qemu-io", "-f", "raw", "-c", "write -P 0x22 256k 256k", ref)
    ok("qemu-io", "-f", "raw", "-c", "write -P 0x33 512k 128k", ref)
    return top, mid, ref


def names(kind, how):
    p = f"{kind}-{how}".replace("-", "_")
    return f"B_{p}", f"M_{p}", f"T_{p}", f"j_{p}"


def stream(vm, kind, how, d):
    """Builds B <- M <- T on `vm`, streams T down to B; returns B's filename
    as query-named-block-nodes shows it."""
    b, m, t, j = names(kind, how)
    _, make, _ = kinds(d)[kind]
    mid, top = os.path.join(d, "mid.qcow2"), os.path.join(d, "top.qcow2")
    if isinstance(make, dict):
        r = vm.raw("blockdev-add", {**make, "node-name": b})
    else:
        r = vm.raw(make[0], {**make[1], "name": b})
    need("return" in r, f"{kind}: making the base: {r}")
    # "direct": the top over the base itself (mid unused).
    chain = [(t, top, b)] if how == "direct" else [(m, mid, b), (t, top, m)]
    for node, f, backing in chain:
        r = vm.raw("blockdev-add", {"driver": "qcow2", "node-name": node,
                                    "file": {"driver": "file", "filename": f}, "backing": backing})
        need("return" in r, f"{kind}: blockdev-add {node}: {r}")
    nodes = {n["node-name"]: n for n in vm.rcmd("query-named-block-nodes")}
    bfile = nodes[b]["file"]
    args = {"device": t, "job-id": j}
    if how == "base":
        args["base"] = bfile
    elif how == "direct":
        args["base-node"] = b
    else:
        args["bottom"] = m
    if how == "mask":
        args["backing-mask-protocol"] = True
    r = vm.raw("block-stream", args)
    need("return" in r, f"{kind}/{how}: block-stream {args}: {r}")
    ev = vm.event_wait("BLOCK_JOB_COMPLETED", 30, {"device": j})
    need("error" not in ev["data"], f"{kind}/{how}: {ev}")
    return bfile


def header(top):
    i = json.loads(ok("qemu-img", "info", "-U", "--output=json", top))
    return i.get("backing-filename"), i.get("backing-filename-format")


def phase_stream(vm, root):
    wrong = []
    for kind, how, d in cases(root):
        qemu_has, _, _ = kinds(d)[kind]
        if qemu_has:
            top, _, _ = images(d, kind, how)
            with qsd_monitor(root) as qsd:
                qsd_file = stream(qsd, kind, how, d)
            want = header(top)
        else:
            name, fmt = SLUICE_ONLY[kind]
            if how == "mask" and kind != "aio":
                fmt = "raw"
            qsd_file, want = None, (name(d), fmt)
        top, _, _ = images(d, kind, how)
        bfile = stream(vm, kind, how, d)
        got = header(top)
        if got != want:
            wrong.append(f"{kind}/{how}: the header names {got}, QEMU's name is {want}")
        if qsd_file is not None and bfile != qsd_file:
            wrong.append(f"{kind}/{how}: query-named-block-nodes shows {bfile!r}, QSD {qsd_file!r}")
        need(want[0] != names(kind, how)[0], f"{kind}/{how}: the node name was expected")
    need(not wrong, "\n".join(wrong))
    phase_snapshot(vm, root)


def snapshot(vm, kind, d):
    """Makes node S of `kind` on `vm` and takes blockdev-snapshot-sync of it
    into snap.qcow2; returns the overlay's path."""
    _, make, _ = kinds(d)[kind]
    s, o = f"S_{kind}".replace("-", "_"), f"O_{kind}".replace("-", "_")
    if isinstance(make, dict):
        r = vm.raw("blockdev-add", {**make, "node-name": s})
    else:
        r = vm.raw(make[0], {**make[1], "name": s})
    need("return" in r, f"{kind}: making the node: {r}")
    snap = os.path.join(d, "snap.qcow2")
    r = vm.raw("blockdev-snapshot-sync", {"node-name": s, "snapshot-file": snap,
                                          "snapshot-node-name": o, "format": "qcow2"})
    need("return" in r, f"{kind}: blockdev-snapshot-sync: {r}")
    return snap


def phase_snapshot(vm, root):
    """The overlay blockdev-snapshot-sync creates names its backing as QEMU does."""
    wrong = []
    for kind in kinds(root):
        if kind.startswith("raw"):
            # sluice's raw node is a device: blockdev-snapshot-sync refuses it
            # ("is not the root of a device"), a limitation of its own.
            continue
        d = os.path.join(root, f"snap-{kind}")
        qemu_has, _, _ = kinds(d)[kind]
        if qemu_has:
            images(d, kind)
            with qsd_monitor(root) as qsd:
                snap = snapshot(qsd, kind, d)
            want = header(snap)
        else:
            name, fmt = SLUICE_ONLY[kind]
            want = (name(d), fmt)
        images(d, kind)
        got = header(snapshot(vm, kind, d))
        if got != want:
            wrong.append(f"snapshot of {kind}: the overlay names {got}, QEMU's name is {want}")
    need(not wrong, "\n".join(wrong))


def phase_judge(root):
    for kind, how, d in cases(root):
        _, _, comparable = kinds(d)[kind]
        top, ref = os.path.join(d, "top.qcow2"), os.path.join(d, "ref.raw")
        if how == "mask" and kind in ("null-co", "null-co-size", "null", "malloc"):
            # QEMU's own header (a json: name of a protocol node, format raw) does not
            # reopen in QEMU ("A block device must be specified"): the QSD
            # comparison and sluice's reopen judge these.
            continue
        r = run("qemu-img", "info", "--backing-chain", top)
        if kind == "malloc":
            # The RAM disk is gone: QEMU refuses the chain by the driver's
            # name; the image itself is sound and names it.
            need(r.returncode != 0 and "Unknown driver 'malloc'" in r.stderr,
                 f"{kind}/{how}: qemu-img info --backing-chain: {r.stdout}{r.stderr}")
            r = run("qemu-img", "check", top)
            need(r.returncode != 0 and "Unknown driver 'malloc'" in r.stderr,
                 f"{kind}/{how}: qemu-img check: {r.stdout}{r.stderr}")
            alone = {"driver": "qcow2", "file": {"driver": "file", "filename": top}, "backing": None}
            ok("qemu-img", "check", "json:" + json.dumps(alone))
            need("malloc" in ok("qemu-img", "info", top), f"{kind}/{how}: qemu-img info")
            continue
        ok("qemu-img", "check", top)
        need(r.returncode == 0, f"{kind}/{how}: qemu-img info --backing-chain: {r.stdout}{r.stderr}")
        need(r.stdout.count("image: ") == 2, f"{kind}/{how}: the chain is not top + base: {r.stdout}")
        if comparable:
            ok("qemu-img", "compare", "-F", "raw", top, ref)


def phase_reopen(vm, root):
    sock = os.path.join(root, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    for kind, how, d in cases(root):
        _, _, comparable = kinds(d)[kind]
        top, ref = os.path.join(d, "top.qcow2"), os.path.join(d, "ref.raw")
        dev = f"dev_{kind}_{how}".replace("-", "_")
        r = vm.raw("bdev_qcow2_open", {"name": dev, "filename": top})
        if kind == "malloc":
            msg = r.get("error", {}).get("desc", "")
            need("error" in r and "malloc" in msg and "backing file" in msg,
                 f"{kind}/{how}: opening an image over a gone RAM disk: {r}")
            continue
        need("return" in r, f"{kind}/{how}: bdev_qcow2_open {top}: {r}")
        nodes = {n["node-name"]: n for n in vm.rcmd("query-named-block-nodes")}
        top_node = next(n for n in nodes.values() if n.get("file") == top)
        need(top_node["backing_file_depth"] == 1, f"{kind}/{how}: reopened without its backing: {top_node}")
        if comparable:
            vm.rcmd("block-export-add", {"type": "nbd", "id": dev, "node-name": dev})
            uri = f"nbd+unix:///{dev}?socket={sock}"
            ok("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, ref)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpc")
    ap.add_argument("--qmp")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--phase", required=True)
    ap.add_argument("--loop")
    a = ap.parse_args()
    global LOOP
    LOOP = a.loop
    if a.phase == "judge":
        phase_judge(a.dir)
    else:
        vm = Vm(a.qmp)
        {"stream": phase_stream, "reopen": phase_reopen}[a.phase](vm, a.dir)
    print(f"ok ({len(kinds(a.dir))} kinds)")


if __name__ == "__main__":
    main()

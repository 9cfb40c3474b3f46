"""Damaged qcow2 images must not be made worse (tests/tests/qcow2_corrupt.rs).

Images are made by qemu-img / qemu-io and patched; sluice serves them over NBD
to qemu-io; qemu-img judges them afterwards, and qemu-io on a copy of the same
image says what QEMU does with the same write. Failures raise AssertionError
with what was seen (never a bare assert)."""

import json
import os
import shutil
import struct
import subprocess

from spdk.rpc.client import JSONRPCClient
from stream_common import parse_args, qemu_img, qemu_img_rc, run_case

MSG_L2 = "Preventing invalid write on metadata (overlaps with active L2 table)"


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def io(*args):
    """qemu-io ARGS: (exit status, stdout + stderr)."""
    r = subprocess.run(["qemu-io", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def check_errors(path):
    """`qemu-img check`'s count of corruptions (leaks are not errors)."""
    r = qemu_img_rc("check", "--output=json", "-U", path)
    expect(r.returncode in (0, 2, 3), f"qemu-img check {path} failed: {r.stdout}{r.stderr}")
    v = json.loads(r.stdout)
    return v.get("corruptions", 0) + v.get("check-errors", 0)


def self_referencing_l2(d, name):
    """A 1 MiB image (64 KiB clusters) with data at 0 and 64k whose first L2
    entry points at its own L2 table (COPIED): one error for qemu-img check."""
    p = os.path.join(d, name)
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    rc, out = io("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 64k", p)
    expect(rc == 0, out)
    with open(p, "r+b") as f:
        f.seek(0x30000)  # qemu-img's L1 table for this size
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        expect(l2 != 0, "no L2 table")
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | l2))
    return p


def unexport(vm, eid):
    vm.cmd("block-export-del", id=eid)
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": eid})


def export(vm, d, node):
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    vm.cmd("block-export-add", type="nbd", id="e0", node_name=node, writable=True)
    return f"nbd+unix:///{node}?socket={sock}"


def case_self_referencing_l2(vm, d):
    p = self_referencing_l2(d, "sr.qcow2")
    before = check_errors(p)
    expect(before == 1, f"the patched image has {before} errors, not 1")
    # What QEMU does with the same write, on a copy.
    q = os.path.join(d, "qemu.qcow2")
    shutil.copy(p, q)
    rc, qout = io("-c", "write -P 0x33 0 4k", q)
    expect("write failed: Input/output error" in qout and MSG_L2 in qout, f"qemu-io: {qout}")

    vm.open(name="vd0", node_name="img0", filename=p)
    uri = export(vm, d, "vd0")
    # The read first: the write then finds its L2 entry cached (the fast path).
    rc, out = io("-f", "raw", "-c", "read 0 4k", "-c", "write -P 0x33 0 4k", uri)
    expect("write failed: Input/output error" in out, f"sluice accepted the write: {out}")
    ev = vm.event_wait("BLOCK_IMAGE_CORRUPTED", 10.0)["data"]
    want = {"device": "vd0", "node-name": "img0", "msg": MSG_L2, "fatal": True}
    for k, v in want.items():
        expect(ev.get(k) == v, f"event member {k}: {ev.get(k)!r}, want {v!r} ({ev})")
    expect(ev.get("offset") == 0x40000 and ev.get("size") == 4096, f"event offset/size: {ev}")
    # JSON-RPC clients poll the same event (SPDK's client, on the JSON-RPC socket).
    notes = JSONRPCClient(parse_args().rpc).call("notify_get_notifications", {"id": 0})
    got = [n["data"] for n in notes if n["type"] == "BLOCK_IMAGE_CORRUPTED"]
    expect(got == [ev], f"JSON-RPC notifications: {notes}")
    # From now on: writes refused (any cluster), reads served.
    rc, out = io("-f", "raw", "-c", "write -P 0x44 64k 4k", uri)
    expect("write failed" in out, f"a write after the corruption was accepted: {out}")
    rc, out = io("-f", "raw", "-r", "-c", "read -P 0x22 64k 64k", uri)
    expect(rc == 0 and "verification failed" not in out and "failed" not in out, f"reads: {out}")
    expect(vm.events("BLOCK_IMAGE_CORRUPTED") == [], "a second BLOCK_IMAGE_CORRUPTED")
    unexport(vm, "e0")
    vm.close("vd0")

    after = check_errors(p)
    expect(after == before, f"qemu-img check: {before} errors before, {after} after")
    qemu_after = check_errors(q)
    expect(qemu_after == before, f"QEMU's copy: {qemu_after} errors")
    info = json.loads(qemu_img("info", "--output=json", p))
    expect(info["format-specific"]["data"].get("corrupt") is True, f"corrupt bit: {info}")
    # The data of the other cluster is intact; the image opens read-only in QEMU.
    rc, out = io("-r", "-c", "read -P 0x22 64k 64k", p)
    expect(rc == 0 and "verification failed" not in out, f"qemu-io read back: {out}")


def case_overlap_check_modes(vm, d):
    """`overlap_check` "constant" does not look at L2 tables: the same write
    goes through, as with qemu-io's overlap-check=constant; a bad value is
    refused with QEMU's text and opens nothing."""
    p = self_referencing_l2(d, "c.qcow2")
    q = os.path.join(d, "qemu.qcow2")
    shutil.copy(p, q)
    rc, qout = io("--image-opts", "-c", "write -P 0x33 0 4k",
                  f"driver=qcow2,overlap-check=constant,file.filename={q}")
    expect(rc == 0 and "failed" not in qout, f"qemu-io with overlap-check=constant: {qout}")
    r = vm.raw("bdev_qcow2_open", {"name": "vd1", "filename": p, "overlap_check": "some"})
    err = r.get("error", {}).get("desc", "")
    expect("Unsupported value 'some' for qcow2 option 'overlap-check'" in err, f"bad value: {r}")
    vm.open(name="vd1", filename=p, overlap_check="constant")
    cfg = json.dumps(vm.cmd("save_config"))
    expect('"overlap_check": "constant"' in cfg, f"save_config lost overlap_check: {cfg}")
    uri = export(vm, d, "vd1")
    rc, out = io("-f", "raw", "-c", "write -P 0x33 0 4k", uri)
    expect(rc == 0 and "failed" not in out, f"overlap_check constant refused the write: {out}")
    expect(vm.events("BLOCK_IMAGE_CORRUPTED") == [], "an event with overlap_check constant")
    unexport(vm, "e0")
    vm.close("vd1")


def case_blockdev_add_overlap_check(vm, d):
    """blockdev-add's `overlap-check` in both QAPI forms; refusals as QEMU's."""
    p = self_referencing_l2(d, "b.qcow2")
    base = {"driver": "qcow2", "node-name": "n0",
            "file": {"driver": "file", "filename": p}}
    for bad, want in [
        ("foo", "Parameter 'overlap-check' does not accept value 'foo'"),
        ({"template": "bad"}, "Parameter 'template' does not accept value 'bad'"),
        ({"active-l2": "x"}, "Invalid parameter type for 'overlap-check.active-l2', expected: boolean"),
        (5, "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
        ({"foo": True}, "Parameter 'overlap-check.foo' is unexpected"),
    ]:
        r = vm.raw("blockdev-add", dict(base, **{"overlap-check": bad}))
        desc = r.get("error", {}).get("desc")
        expect(desc == want, f"overlap-check {bad!r}: {r}, want {want!r}")
    # The object form: the template without the L2 check lets the write through.
    vm.rcmd("blockdev-add", dict(base, **{"overlap-check": {"template": "all", "active-l2": False}}))
    uri = export(vm, d, "n0")
    rc, out = io("-f", "raw", "-c", "write -P 0x33 0 4k", uri)
    expect(rc == 0 and "failed" not in out, f"active-l2 off refused the write: {out}")
    unexport(vm, "e0")
    vm.rcmd("blockdev-del", {"node-name": "n0"})
    # The string form, checked: refused.
    p2 = self_referencing_l2(d, "b2.qcow2")
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "n1", "overlap-check": "all",
                             "file": {"driver": "file", "filename": p2}})
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("block-export-add", type="nbd", id="e1", node_name="n1", writable=True)
    rc, out = io("-f", "raw", "-c", "write -P 0x33 0 4k", f"nbd+unix:///n1?socket={sock}")
    expect("write failed: Input/output error" in out, f"overlap-check all let it through: {out}")
    ev = vm.event_wait("BLOCK_IMAGE_CORRUPTED", 10.0)["data"]
    expect(ev.get("node-name") == "n1" and ev.get("device") == "", f"event: {ev}")
    unexport(vm, "e1")
    vm.rcmd("blockdev-del", {"node-name": "n1"})


if __name__ == "__main__":
    run_case(globals())

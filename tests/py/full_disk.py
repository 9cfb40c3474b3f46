"""Full-disk scenarios against sluice, through qemu.qmp: the image sluice writes
lives on a small tmpfs (--mnt) that a filler file has all but filled; the
backing chain and the references live in --dir on the normal disk. Images are
judged by qemu-img check / compare. One scenario per run (--case); the Rust
side (tests/tests/full_disk.rs) mounts the tmpfs and stops the daemon."""

import argparse
import json
import os
import re
import subprocess

from stream_common import Vm, compare_raw, info, qemu_img, qemu_io, qmap, reference

MIB = 1 << 20


def parse_args():
    ap = argparse.ArgumentParser()
    for a in ("--rpc", "--qmp", "--dir", "--mnt", "--case"):
        ap.add_argument(a, required=True)
    return ap.parse_args()


def free_bytes(mnt):
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def fill(mnt, leave):
    """Fills the filesystem at `mnt` with a file until `leave` bytes are free; returns its path."""
    path = os.path.join(mnt, "filler")
    chunk = b"\xa5" * MIB
    with open(path, "wb") as f:
        while free_bytes(mnt) > leave:
            n = min(MIB, free_bytes(mnt) - leave)
            f.write(chunk[:n])
            f.flush()
    if not (free_bytes(mnt) <= leave):
        raise AssertionError((free_bytes(mnt), leave))
    return path


def check_report(path):
    """qemu-img check: no corruption; returns the JSON report (leaks are in it)."""
    r = subprocess.run(["qemu-img", "check", "-U", "--output=json", path], capture_output=True, text=True)
    # 0: clean, 3: leaked clusters only; 2 (corrupt) and 1 (check failed) are errors.
    if not (r.returncode in (0, 3)):
        raise AssertionError(f"qemu-img check {path}: rc {r.returncode}: {r.stdout}{r.stderr}")
    return json.loads(r.stdout)


# The chain: base (32 MiB of data in a 64 MiB image, on the normal disk) <- top
# (on the tmpfs; one cluster of its own). The copy (about 32 MiB) cannot fit in
# the 8 MiB the filler leaves free.
VSIZE = "64M"
BASE_WRITES = ["write -P 0x11 0 12M", "write -P 0x22 16M 12M", "write -P 0x33 40M 8M", "write -z 44M 1M"]
TOP_WRITES = ["write -P 0x44 20M 64k"]
LEAVE = 8 * MIB


def chain(d, mnt):
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(mnt, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, VSIZE)
    cmds = []
    for w in BASE_WRITES:
        cmds += ["-c", w]
    qemu_io("-f", "qcow2", *cmds, base)
    # 4 KiB clusters: an L2 table per 2 MiB, so the copy needs new tables
    # (whose space is taken when they are allocated) all along.
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F", "qcow2", top, VSIZE)
    cmds = []
    for w in TOP_WRITES:
        cmds += ["-c", w]
    qemu_io("-f", "qcow2", *cmds, top)
    ref = reference(d, top)
    filler = fill(mnt, LEAVE)
    return base, top, ref, filler


def nospace_stop(vm, top):
    """The job meets the full disk and stops: BLOCK_JOB_ERROR (write, stop), paused, io-status nospace."""
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    if not (ev["data"] == {"device": "drive0", "operation": "write", "action": "stop"}):
        raise AssertionError(ev)
    j = vm.pause_wait("drive0")
    if not (j["status"] == "paused" and j["io-status"] == "nospace"):
        raise AssertionError(j)
    # The offset is the done prefix, as QEMU's in-order copy reports it: every
    # byte of the base below it is in the top already. The copy starts with
    # one chunk in flight (slow start) and 8 MiB are free, so the first chunks
    # fit: the offset is past 0 and the check below means something.
    if not (0 < j["offset"] < j["len"]):
        raise AssertionError(j)
    # The copier flushes the top before it pauses, so what it reports copied
    # is in the file, L2 tables included, as soon as the job shows paused:
    # qemu-img reads the file while the daemon holds it, no waiting.
    below_in_base = [e for e in qmap(top) if e["depth"] > 0 and e["data"] and e["start"] < j["offset"]]
    if below_in_base:
        raise AssertionError(f"offset {j['offset']} reported, base data below it not in the top's file: {below_in_base}")
    return j


def case_stream_enospc(vm, d, mnt):
    base, top, ref, filler = chain(d, mnt)
    vm.open(name="drive0", node_name="top", filename=top)
    vm.cmd("block-stream", device="drive0", on_error="enospc")
    j = nospace_stop(vm, top)
    # Paused, it stays paused (no busy loop of retries) and the daemon answers.
    if not (vm.job("drive0")["offset"] == j["offset"]):
        raise AssertionError('failed: vm.job("drive0")["offset"] == j["offset"]')
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1')
    # Free the space and resume: the job copies the rest and drops the backing file.
    os.unlink(filler)
    vm.cmd("block-job-resume", device="drive0")
    ev = vm.wait_until_completed()
    if not (ev["offset"] == ev["len"] == 64 * MIB):
        raise AssertionError(ev)
    vm.assert_no_active_block_jobs()
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 0):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 0')
    vm.close("drive0")
    if not ("backing-filename" not in info(top)):
        raise AssertionError(info(top))
    rep = check_report(top)
    if not (rep.get("leaks", 0) == 0 and rep.get("corruptions", 0) == 0):
        raise AssertionError(rep)
    compare_raw(top, ref)


def case_stream_report(vm, d, mnt):
    base, top, ref, filler = chain(d, mnt)
    vm.open(name="drive0", node_name="top", filename=top)
    vm.cmd("block-stream", device="drive0")
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    if not (ev["data"] == {"device": "drive0", "operation": "write", "action": "report"}):
        raise AssertionError(ev)
    c = vm.wait_until_completed(error="No space left on device")
    if not (c["offset"] < c["len"]):
        raise AssertionError(c)
    vm.assert_no_active_block_jobs()
    # Still full: the device keeps its backing file, serves reads, and closes.
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1')
    vm.close("drive0")
    if not (info(top)["backing-filename"] == base):
        raise AssertionError(info(top))
    rep = check_report(top)
    print("check after the failed stream:", json.dumps({k: rep.get(k, 0) for k in ("leaks", "corruptions")}))
    # sluice gives back the clusters of a copy that failed: no leak either.
    if not (rep.get("corruptions", 0) == 0 and rep.get("leaks", 0) == 0):
        raise AssertionError(rep)
    compare_raw(top, ref)
    # A writable open on the full disk works (the file is extended sparsely).
    vm.open(name="drive0", node_name="top", filename=top)
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1')
    # With space again, the same image streams to the end.
    os.unlink(filler)
    vm.cmd("block-stream", device="drive0")
    vm.wait_until_completed()
    vm.close("drive0")
    if not ("backing-filename" not in info(top)):
        raise AssertionError(info(top))
    rep = check_report(top)
    if not (rep.get("leaks", 0) == 0):
        raise AssertionError(rep)
    compare_raw(top, ref)


WROTE = re.compile(r"^wrote (\d+)/(\d+) bytes at offset (\d+)$")


def nbd_io(uri, cmds, read_only=False, cache=None):
    """qemu-io over NBD (it must finish: a hang is a failure); returns (rc, output).
    qemu-io's default cache mode is writethrough: every write is sent with FUA
    (durable, metadata included, before the reply) unless `cache` is "writeback"."""
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else []) + (["-t", cache] if cache else [])
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def write_blocks(uri, blocks, bs):
    """Writes block i (of `bs` bytes) with pattern i+1 for each i in `blocks`,
    then flushes (a second client: qemu-io reports a failed flush only in its
    exit status); returns the blocks acknowledged, the blocks that failed with
    ENOSPC and whether the flush failed."""
    rc, out = nbd_io(uri, [f"write -P {i + 1} {i * bs} {bs}" for i in blocks])
    acked = []
    for line in out.splitlines():
        m = WROTE.match(line.strip())
        if m:
            if not (m.group(1) == m.group(2) == str(bs)):
                raise AssertionError(line)
            acked.append(int(m.group(3)) // bs)
    failed = out.count("write failed: No space left on device")
    if not (len(acked) + failed == len(blocks)):
        raise AssertionError(f"{len(acked)} acked + {failed} failed != {len(blocks)}:\n{out}")
    # Any other error (EIO, EPERM from an image that gave up) is a failure.
    other = [l for l in out.splitlines() if "failed" in l and "No space left on device" not in l]
    if other:
        raise AssertionError(out)
    frc, fout = nbd_io(uri, ["flush"])
    if not (frc == 0 or not fout.strip()):
        raise AssertionError(fout)  # a failed flush prints nothing
    return acked, [i for i in blocks if i not in acked], frc != 0


def verify_blocks(uri, blocks, bs):
    rc, out = nbd_io(uri, [f"read -P {i + 1} {i * bs} {bs}" for i in blocks], read_only=True)
    if not (rc == 0 and "fail" not in out):
        raise AssertionError(out)


def nbd_writes(vm, d, mnt, cluster, bs, n, leave, free_later):
    """A client writes `n` blocks of `bs` bytes over NBD onto an image (clusters
    of `cluster` bytes) on a disk with `leave` bytes free, until the disk is
    full. With `free_later`, the filler is then removed and the failed blocks
    are written again: the image must take them (it did not give up). Writes
    the blocks acknowledged to DIR/acked.json for the Rust side to verify after
    the daemon stopped."""
    img = os.path.join(mnt, "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, VSIZE)
    filler = fill(mnt, leave)
    vm.open(name="drive0", node_name="img", filename=img)
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="drive0", writable=True)
    uri = f"nbd+unix:///drive0?socket={sock}"
    acked, failed, flush_failed = write_blocks(uri, list(range(n)), bs)
    print(f"{len(acked)} writes of {bs} bytes acknowledged, {len(failed)} failed with ENOSPC; "
          f"flush {'failed' if flush_failed else 'ok'}")
    if not (failed):
        raise AssertionError("the disk never filled up")
    if not (len(acked) >= 2):
        raise AssertionError("too few writes succeeded")
    # New metadata clusters took their space when allocated: writing the
    # metadata needs none, so even on the full disk the flush succeeds.
    if flush_failed:
        raise AssertionError("the flush failed on the full disk")
    # The daemon keeps serving: a new client reads back what was acknowledged, QMP answers.
    verify_blocks(uri, acked, bs)
    if not (vm.cmd("query-block")[0]["inserted"]["node-name"] == "img"):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["node-name"] == "img"')
    if free_later:
        os.unlink(filler)
        again, still, flush_failed = write_blocks(uri, failed, bs)
        if still and not flush_failed:
            raise AssertionError((still, flush_failed))
        acked += again
        verify_blocks(uri, acked, bs)
    save_acked(d, img, [(i + 1, i * bs, bs) for i in sorted(acked)])


def save_acked(d, img, writes):
    """Leaves the image and the writes acknowledged, (pattern, offset, length),
    in DIR/acked.json for the Rust side."""
    with open(os.path.join(d, "acked.json"), "w") as f:
        json.dump({"image": img, "writes": [{"pattern": p, "offset": o, "len": n} for p, o, n in writes]}, f)


def case_nbd_writes(vm, d, mnt):
    """The disk stays full until the daemon stops."""
    nbd_writes(vm, d, mnt, 65536, MIB, 24, 6 * MIB, False)


def case_nbd_writes_small_clusters(vm, d, mnt):
    """512-byte clusters: allocations need new L2 tables, refcount blocks and
    refcount table growth all along, so those meet the full disk too; space is
    freed afterwards and the image must take the failed writes."""
    nbd_writes(vm, d, mnt, 512, 256 << 10, 64, 12 * MIB, True)


def case_metadata_enospc(vm, d, mnt):
    """A metadata write (the L1 table, written when a flush makes a new L2
    table reachable) fails with ENOSPC, injected by an error bdev under the
    image: the flush reports it, the image does not give up, and once there is
    space again the next flush writes what the failed one did not."""
    img = os.path.join(d, "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, VSIZE)
    with open(img, "rb") as f:
        l1 = int.from_bytes(f.read(48)[40:48], "big")
    os.truncate(img, 96 * MIB)  # room to grow (bdev_qcow2_open would extend it; a bare uring bdev does not)
    vm.rcmd("bdev_uring_create", {"name": "imgfile", "filename": img})
    vm.rcmd("bdev_error_create", {"base_name": "imgfile"})
    vm.open(name="drive0", node_name="img", base_bdev="EE_imgfile", no_backing=True)
    vm.rcmd("bdev_error_inject_error", {"name": "EE_imgfile", "io_type": "write", "error_type": "enospc",
                                        "num": 1, "offset": l1, "length": 512})
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="drive0", writable=True)
    uri = f"nbd+unix:///drive0?socket={sock}"
    # The write (plain: a FUA write would need the L1 entry at once) is
    # acknowledged; the flush that needs the L1 entry fails.
    rc, out = nbd_io(uri, ["write -P 1 0 1M", "flush"], cache="writeback")
    if not ("wrote 1048576/1048576 bytes at offset 0" in out and "write failed" not in out):
        raise AssertionError(out)
    if not (rc != 0):
        raise AssertionError(f"the flush did not fail:\n{out}")
    # Space is back (the injected error is used up): writes and flushes work again.
    rc, out = nbd_io(uri, ["write -P 9 8M 1M", "flush"])
    if not (rc == 0 and "wrote 1048576/1048576 bytes at offset 8388608" in out):
        raise AssertionError(out)
    verify_blocks(uri, [0, 8], MIB)
    save_acked(d, img, [(1, 0, MIB), (9, 8 * MIB, MIB)])


def main():
    a = parse_args()
    vm = Vm(a.qmp)
    globals()["case_" + a.case](vm, a.dir, a.mnt)
    print("ok")


main()

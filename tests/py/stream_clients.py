"""Client I/O on a device while it streams (and while it moves onto another
image): qemu-io over NBD writes and reads with verification against a model
of every 4 KiB block; nothing written may be lost, every read must match.

Cases: verify (stream under a client workload), live_copy (snapshot onto a
malloc bdev, then stream, under the workload)."""

import os
import random
import subprocess
import threading

from stream_common import run_case, check, compare_raw, info, make_chain, qemu_img, reference

BS = 4096


class Model:
    """The expected byte of every 4 KiB block (each block holds one value)."""

    def __init__(self, raw):
        data = open(raw, "rb").read()
        self.blocks = []
        for i in range(len(data) // BS):
            b = data[i * BS:(i + 1) * BS]
            if not (b.count(b[0]) == BS):
                raise AssertionError(f"block {i} of the reference is not uniform")
            self.blocks.append(b[0])

    def write_raw(self, path):
        with open(path, "wb") as f:
            for v in self.blocks:
                f.write(bytes([v]) * BS)


class Workload(threading.Thread):
    """Batches of qemu-io commands over NBD until stopped; fails on any mismatch."""

    def __init__(self, uri, model, seed):
        super().__init__(daemon=True)
        self.uri, self.model, self.rng = uri, model, random.Random(seed)
        self.stop = threading.Event()
        self.error = None
        self.batches = 0

    def batch(self):
        cmds = []
        n = len(self.model.blocks)
        for _ in range(200):
            blk = self.rng.randrange(n)
            if self.rng.random() < 0.4:
                v = self.rng.randrange(0x40, 0xff)
                cnt = self.rng.choice([1, 1, 2, 4])
                cnt = min(cnt, n - blk)
                cmds += ["-c", f"write -P {v} {blk * BS} {cnt * BS}"]
                for i in range(cnt):
                    self.model.blocks[blk + i] = v
            else:
                cmds += ["-c", f"read -P {self.model.blocks[blk]} {blk * BS} {BS}"]
        r = subprocess.run(["qemu-io", "-f", "raw", *cmds, self.uri], capture_output=True, text=True)
        if r.returncode != 0 or "verification failed" in r.stdout or "error" in r.stdout.lower():
            raise AssertionError(f"qemu-io batch failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")

    def run(self):
        try:
            while not self.stop.is_set() or self.batches < 3:
                self.batch()
                self.batches += 1
        except AssertionError as e:
            self.error = e

    def finish(self):
        self.stop.set()
        self.join(300)
        if self.is_alive():
            raise AssertionError("workload hung")
        if self.error:
            raise self.error


def setup(vm, d):
    paths = make_chain(d, ["base", "mid", "top"], "64M",
                       [["write -P 0x1 0 32M"], ["write -P 0x2 16M 24M", "write -z 20M 2M"], ["write -P 0x3 1M 1M"]])
    ref = reference(d, paths[-1])
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
    vm.cmd("block-export-add", type="nbd", id="exp0", node_name="drive0", writable=True)
    return paths, ref, f"nbd+unix:///drive0?socket={sock}"


def finish(vm, d, w, uri):
    w.finish()
    expect = os.path.join(d, "expect.raw")
    w.model.write_raw(expect)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, expect], capture_output=True, text=True)
    if not (r.returncode == 0):
        raise AssertionError(f"device content differs from the model: {r.stdout} {r.stderr}")
    vm.cmd("block-export-del", id="exp0")
    vm.cmd("nbd-server-stop")
    return expect


def case_verify(vm, d):
    paths, ref, uri = setup(vm, d)
    w = Workload(uri, Model(ref), 1)
    w.start()
    while w.batches < 1:
        w.join(0.05)
        if not (w.error is None):
            raise AssertionError(w.error)
    vm.cmd("block-stream", device="drive0", speed=16 << 20)
    vm.wait_until_completed(timeout=300)
    expect = finish(vm, d, w, uri)
    if not (w.batches >= 3):
        raise AssertionError(w.batches)
    vm.close("drive0")
    if not ("backing-filename" not in info(paths[-1])):
        raise AssertionError('failed: "backing-filename" not in info(paths[-1])')
    check(paths[-1])
    compare_raw(paths[-1], expect)


def case_live_copy(vm, d):
    paths, ref, uri = setup(vm, d)
    vm.rcmd("bdev_malloc_create", {"name": "Copy0", "num_blocks": (160 << 20) // 512, "block_size": 512})
    w = Workload(uri, Model(ref), 2)
    w.start()
    while w.batches < 1:
        w.join(0.05)
        if not (w.error is None):
            raise AssertionError(w.error)
    vm.cmd("blockdev-snapshot-sync", device="drive0", snapshot_file="Copy0", snapshot_node_name="copy", format="qcow2")
    ins = vm.cmd("query-block")[0]["inserted"]
    if not (ins["node-name"] == "copy" and ins["backing_file_depth"] == 3):
        raise AssertionError(ins)
    vm.cmd("block-stream", device="drive0")
    vm.wait_until_completed(timeout=300)
    ins = vm.cmd("query-block")[0]["inserted"]
    if not (ins["node-name"] == "copy" and ins["backing_file_depth"] == 0):
        raise AssertionError(ins)
    finish(vm, d, w, uri)
    # The old chain was released and is consistent; the copy lives on Copy0 only.
    names = [b["name"] for b in vm.rcmd("bdev_get_bdevs")]
    if not ("top" not in names and "Copy0" in names and "copy" in names):
        raise AssertionError(names)
    for p in paths:
        check(p)


run_case(globals())

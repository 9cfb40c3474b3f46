"""Phases of the SIGKILL test of the block jobs, with a client writing over
NBD the whole time (`nbd_writer.py` logs every acknowledged write).

--case JOB-start: a fresh 64 MiB chain base <- mid <- top, opened node by
    node (writable, as a commit needs), device drive0 on top exported over
    NBD, the writer started (detached; it stops when the daemon dies), then
    the job started slowed: `stream` (block-stream), `commit` (top-node=mid),
    `active` (block-commit of the whole chain, not completed) or
    `active_complete` (READY awaited, then block-job-complete sent without
    waiting for its answer: the kill lands around the pivot), `mirror`
    (blockdev-mirror sync=full onto an empty qcow2 node) or
    `mirror_complete` (likewise, around its pivot). The test SIGKILLs the daemon after a while.
--case JOB-finish (on a new daemon): waits for the writer to exit, then
    judges what the kill left: every image `qemu-img check` clean (leaks
    allowed) and every durable write (acknowledged with FUA, or before an
    acknowledged flush) readable in the device's view: the chain through
    top, or (an active commit that pivoted) base alone. A block written
    after its last durable write may read any of the later values. Then a new job finishes
    the work where it is not done, and the result is judged again: the
    model's content, qemu-img check, the layers gone from the chain."""

import json
import os
import socket
import subprocess
import sys
import time

from stream_common import Vm, make_chain, parse_args, qemu_img, qemu_img_rc, reference

BS = 4096
MiB = 1 << 20
SIZE = 64 * MiB
REGION = 8 * MiB  # the writer's blocks: dense enough that a mirror converges


class Failure(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise Failure(msg)


def paths(d):
    return [os.path.join(d, f"{n}.qcow2") for n in ("base", "mid", "top")]


def start(vm, d, job, pyexe, qmp):
    base, mid, top = make_chain(d, ["base", "mid", "top"], "64M",
                                [["write -P 0x1 0 40M"], ["write -P 0x2 24M 32M", "write -z 30M 1M"],
                                 ["write -P 0x3 0 1M", "write -P 0x4 60M 2M"]])
    reference(d, top)
    vm.open_nodes([base, mid, top], ["base", "mid", "top"], device="drive0")
    sock = os.path.join(d, "nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "drive0", "writable": True})
    log = os.path.join(d, "writes.log")
    w = subprocess.Popen([pyexe, os.path.join(os.path.dirname(__file__), "nbd_writer.py"), sock, "drive0", log,
                          str(REGION), str(int(time.time() * 1000) % 100000), "2"],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log + ".err", "w"))
    with open(os.path.join(d, "writer.pid"), "w") as f:
        f.write(str(w.pid))
    while not os.path.exists(log):
        time.sleep(0.01)
    # The job starts once the writer has made a write durable, so every
    # kill has something to lose.
    deadline = time.time() + 20
    while not any(line.startswith("FA") or line.endswith(" 1\n") and line.startswith("A")
                  for line in open(log)):
        expect(time.time() < deadline and w.poll() is None, "the NBD writer made no write durable")
        time.sleep(0.01)
    speed = 24 * MiB
    if job == "stream":
        vm.cmd("block-stream", device="drive0", speed=speed)
    elif job == "commit":
        vm.rcmd("block-commit", {"job-id": "j0", "device": "drive0", "top-node": "mid", "speed": speed})
    elif job.startswith("mirror"):
        add_target(vm, d)
        vm.rcmd("blockdev-mirror", {"job-id": "j0", "device": "drive0", "target": "tgt", "sync": "full",
                                    "speed": speed})
    else:
        vm.rcmd("block-commit", {"job-id": "j0", "device": "drive0", "speed": speed})
    if job.endswith("_complete"):
        vm.event_wait("BLOCK_JOB_READY", 60, {"device": "j0"})
        send_only(qmp, {"execute": "block-job-complete", "arguments": {"device": "j0"}})


def add_target(vm, d):
    """An empty qcow2 of the chain's size as node `tgt` (made once per round)."""
    tgt = os.path.join(d, "target.qcow2")
    if not os.path.exists(tgt):
        qemu_img("create", "-q", "-f", "qcow2", tgt, "64M")
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                             "file": {"driver": "file", "filename": tgt}})


def send_only(path, cmd):
    """Sends one QMP command on a connection of its own and returns without
    its reply, so that the kill can land while the command runs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rwb")
    f.readline()  # greeting
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.flush()
    expect(b'"return"' in f.readline(), "qmp_capabilities refused")
    f.write(json.dumps(cmd).encode() + b"\n")
    f.flush()


def wait_writer(d):
    pid = int(open(os.path.join(d, "writer.pid")).read())
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # A zombie (its parent, the start phase, is gone): reaped by init.
        try:
            if open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z":
                break
        except OSError:
            break
        time.sleep(0.02)
    else:
        raise Failure("the NBD writer did not stop after the daemon died")
    err = open(os.path.join(d, "writes.log.err")).read()
    expect(err.strip() == "", f"the NBD writer failed: {err}")


def model(d):
    """What each 4 KiB block may read after the kill: ({block: durable
    content}, {block: [later values, acknowledged but not flushed, or in
    flight]}) over the reference, and the count of durable writes."""
    ref = open(os.path.join(d, "ref.raw"), "rb").read()
    sure = {i: ref[i * BS:(i + 1) * BS] for i in range(len(ref) // BS)}
    maybe = {}
    sent = None
    durable = 0
    for line in open(os.path.join(d, "writes.log")):
        f = line.split()
        if f[0] == "S":
            sent = (int(f[1]) // BS, int(f[2]))
            maybe.setdefault(sent[0], []).append(bytes([sent[1]]) * BS)
        elif f[0] == "A":
            b, val, fua = int(f[1]) // BS, int(f[2]), f[3] == "1"
            expect(sent == (b, val), f"log out of order at {line!r}")
            if fua:  # durable at its reply, superseding what came before
                sure[b] = bytes([val]) * BS
                maybe.pop(b, None)
                durable += 1
        elif f[0] == "FA":  # everything acknowledged before the flush
            for b, vals in maybe.items():
                sure[b] = vals[-1]
                durable += 1
            maybe = {}
    return sure, maybe, durable


def view(image, d):
    """The guest-visible bytes of `image` with its chain (None if it does not open)."""
    raw = os.path.join(d, "view.raw")
    r = qemu_img_rc("convert", "-U", "-O", "raw", image, raw)
    if r.returncode != 0:
        return None
    data = open(raw, "rb").read()
    os.unlink(raw)
    return data


def judge(image, data, sure, maybe):
    """None when `data` is a state the model allows, else why not."""
    if data is None:
        return f"{image} does not open"
    if len(data) != SIZE:
        return f"{image} is {len(data)} bytes"
    for i, want in sure.items():
        got = data[i * BS:(i + 1) * BS]
        if got != want and got not in maybe.get(i, []):
            return f"{image}: block {i} (offset {i * BS}) reads {got[:4].hex()}.., want {want[:4].hex()}.."
    return None


def checked(path):
    r = qemu_img_rc("check", "-U", path)
    expect(r.returncode in (0, 3), f"qemu-img check {path} after the kill: rc {r.returncode}: {r.stdout}{r.stderr}")


def backing(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path)).get("backing-filename")


def finish(vm, d, job):
    wait_writer(d)
    base, mid, top = paths(d)
    tgt = os.path.join(d, "target.qcow2")
    # The other image the disk may have moved onto: base (active commit) or
    # the mirror's target.
    alt = tgt if job.startswith("mirror") else base
    for p in (base, mid, top) + ((tgt,) if job.startswith("mirror") else ()):
        checked(p)
    sure, maybe, durable = model(d)
    expect(durable > 0, "no write was made durable before the kill")
    top_data = view(top, d)
    through_top = judge(top, top_data, sure, maybe)
    moves = job.startswith(("active", "mirror"))
    base_data = view(alt, d) if moves else None
    through_base = judge(alt, base_data, sure, maybe) if moves else "n/a"
    expect(through_top is None or through_base is None,
           f"durable writes lost: through top: {through_top}; {os.path.basename(alt)} alone: {through_base}")
    # From here on the disk's content is what the kill left.
    expected = top_data if through_top is None else base_data
    # A new job finishes the work.
    if job == "stream":
        vm.open(name="drive0", filename=top)
        vm.cmd("block-stream", device="drive0")
        vm.event_wait("BLOCK_JOB_COMPLETED", 120, {"device": "drive0"})
        vm.close("drive0")
        expect(backing(top) is None, f"top still has a backing file: {backing(top)}")
        result = top
    elif job == "commit":
        if backing(top) == base:  # the kill came after the header changed: done
            vm.open_nodes([base, top], ["base", "top"], device="drive0")
        else:
            vm.open_nodes([base, mid, top], ["base", "mid", "top"], device="drive0")
            vm.rcmd("block-commit", {"job-id": "j1", "device": "drive0", "top-node": "mid"})
            vm.event_wait("JOB_STATUS_CHANGE", 120, {"id": "j1", "status": "null"})
        vm.close("drive0")
        expect(backing(top) == base, f"top's backing is {backing(top)}, not base")
        result = top
    elif job.startswith("mirror"):
        if through_top is None:  # it had not pivoted: mirror again onto the target
            vm.open_nodes([base, mid, top], ["base", "mid", "top"], device="drive0")
            add_target(vm, d)
            vm.rcmd("blockdev-mirror", {"job-id": "j1", "device": "drive0", "target": "tgt", "sync": "full"})
            vm.event_wait("BLOCK_JOB_READY", 120, {"device": "j1"})
            vm.rcmd("block-job-complete", {"device": "j1"})
            vm.event_wait("JOB_STATUS_CHANGE", 120, {"id": "j1", "status": "null"})
            done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
            expect(len(done) == 1 and "error" not in done[0]["data"], f"j1: {done}")
            vm.close("drive0")
        result = tgt
    elif through_top is None:  # an active commit that had not pivoted: again
        vm.open_nodes([base, mid, top], ["base", "mid", "top"], device="drive0")
        vm.rcmd("block-commit", {"job-id": "j1", "device": "drive0"})
        vm.event_wait("BLOCK_JOB_READY", 120, {"device": "j1"})
        vm.rcmd("block-job-complete", {"device": "j1"})
        vm.event_wait("JOB_STATUS_CHANGE", 120, {"id": "j1", "status": "null"})
        done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
        expect(len(done) == 1 and "error" not in done[0]["data"], f"j1: {done}")
        for n in ("drive0",):
            vm.close(n)
        result = base
    else:  # it had pivoted: base is the disk
        result = base
    for p in (base, mid, top) + ((tgt,) if job.startswith("mirror") else ()):
        r = qemu_img_rc("check", "-U", p)
        expect(r.returncode in (0, 3), f"qemu-img check {p} after the job: rc {r.returncode}: {r.stdout}{r.stderr}")
    expect(view(result, d) == expected, f"after the new job, {result} does not read as the disk did")
    print(f"{job}: {durable} durable writes kept; the kill left the disk in "
          f"{'the chain through top' if through_top is None else os.path.basename(alt) + ' (pivoted)'}")


def main():
    a = parse_args()
    job, phase = a.case.rsplit("-", 1)
    vm = Vm(a.qmp)
    try:
        if phase == "start":
            start(vm, a.dir, job, sys.executable, a.qmp)
        else:
            finish(vm, a.dir, job)
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
    print("ok")


main()

"""The vhost-user-blk export end to end through the real binary, driven by
the test front end in vhost_client.py: verified I/O over several queues (the
image judged by qemu-img compare), hostile front ends beside a healthy one,
the QMP conversation compared with qemu-storage-daemon 10 (whose own export
also serves the same verified I/O, which checks the client), SPDK's
vhost_*_controller methods, SPDK's interrupt coalescing
(vhost_controller_set_coalescing), and an export following its node through
a snapshot."""

import os
import random
import select
import struct
import subprocess
import time

from spdk.rpc.client import JSONRPCClient, JSONRPCException

import vhost_client as vc
from stream_common import compare_raw, parse_args, qemu_img, qsd_monitor, Vm

MiB = 1 << 20


class Failure(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failure(what)


def ok(vm, cmd, **kw):
    r = vm.qmp(cmd, **kw)
    if "return" not in r:
        raise Failure(f"{cmd} {kw}: {r}")
    return r["return"]


def err(vm, cmd, args):
    r = vm.raw(cmd, args)
    if "error" not in r:
        raise Failure(f"{cmd} {args}: expected an error, got {r}")
    return r["error"]["desc"]


def raw_image(d, name, size, fill=None):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
    return p


def export(vm, d, node, eid, writable=True, queues=1, **extra):
    path = os.path.join(d, f"{eid}.sock")
    ok(vm, "block-export-add", type="vhost-user-blk", id=eid, node_name=node,
       addr={"type": "unix", "path": path}, writable=writable, num_queues=queues, **extra)
    return path


def wait_for_socket(path, timeout=10):
    t0 = time.time()
    while not os.path.exists(path):
        if time.time() - t0 > timeout:
            raise Failure(f"{path} did not appear")
        time.sleep(0.02)


class Shadow:
    """What the disk should hold, for verified random I/O."""

    def __init__(self, size, content=None):
        self.b = bytearray(content if content is not None else bytes(size))

    def io(self, c, rings, n, rng, max_len=64 * 1024):
        size = len(self.b)
        for k in range(n):
            ring = rings[k % len(rings)]
            ln = rng.randrange(1, max_len // 512 + 1) * 512
            off = rng.randrange(0, (size - ln) // 512 + 1) * 512
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(ln)
                c.write(ring, off, data)
                self.b[off:off + ln] = data
            elif op < 0.55 and c.features & (1 << vc.F_WRITE_ZEROES):
                expect(c.range_op(ring, vc.T_WRITE_ZEROES, off, ln) == vc.S_OK, "write-zeroes failed")
                self.b[off:off + ln] = bytes(ln)
            else:
                got = c.read(ring, off, ln)
                if got != bytes(self.b[off:off + ln]):
                    raise Failure(f"read {off}+{ln} on queue {ring.index}: data differ")

    def verify(self, c, ring, chunk=256 * 1024):
        for off in range(0, len(self.b), chunk):
            if c.read(ring, off, chunk) != bytes(self.b[off:off + chunk]):
                raise Failure(f"verify at {off}: data differ")

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.b)


def verified_session(sock, shadow, queues, n, seed):
    c = vc.Client(sock)
    rings = c.start(queues=queues)
    expect(c.capacity() == len(shadow.b), f"capacity {c.capacity()} != {len(shadow.b)}")
    shadow.io(c, rings, n, random.Random(seed))
    expect(c.io(rings[0], vc.T_FLUSH)[0] == vc.S_OK, "flush failed")
    return c, rings


def indirect_read(c, ring, off, n):
    """A read whose header, data and status descriptors sit in an indirect
    table: (status, data)."""
    m = c.mem
    hdr, din, st, tab = m.alloc(16, 16), m.alloc(n), m.alloc(1, 1), m.alloc(48, 16)
    m.write(hdr, struct.pack("<IIQ", vc.T_IN, 0, off // 512))
    m.write(din, b"\xa5" * n)
    m.write(st, b"\xff")
    m.write(tab, struct.pack("<QIHH", hdr, 16, vc.D_NEXT, 1) + struct.pack("<QIHH", din, n, vc.D_WRITE | vc.D_NEXT, 2)
            + struct.pack("<QIHH", st, 1, vc.D_WRITE, 0))
    (head,) = c.submit_chain(ring, [(tab, 48, vc.D_INDIRECT)])
    c.wait(ring, [head])
    return m.read(st, 1)[0], m.read(din, n)


def case_verified_io(vm, d):
    """Random writes, write-zeroes and reads over 2 queues (2 reactors),
    verified against a shadow; flush, discard, get-id, an unknown type; a
    second connection sees the data; the image then equals the shadow
    (qemu-img compare). A read-only export offers RO and fails writes."""
    size = 8 * MiB
    img = raw_image(d, "disk.raw", size)
    ok(vm, "blockdev-add", driver="file", filename=img, node_name="disk")
    sock = export(vm, d, "disk", "vb0", queues=2)
    shadow = Shadow(size)
    c, rings = verified_session(sock, shadow, 2, 600, 1)
    expect(c.queue_num() == 2, "GET_QUEUE_NUM")
    st, ident = c.io(rings[0], vc.T_GET_ID, read_len=20)
    expect(st == vc.S_OK and ident.rstrip(b"\0") == b"vb0", f"get-id: {st} {ident!r}")
    expect(c.io(rings[1], 99)[0] == vc.S_UNSUPP, "unknown request type must be UNSUPP")
    expect(c.range_op(rings[1], vc.T_DISCARD, 0, 4096, flags=1) == vc.S_UNSUPP, "discard flags must be UNSUPP")
    # A read through an indirect descriptor table (the export offers them).
    for off, n in ((0, 4096), (size - 65536, 65536)):
        st, got = indirect_read(c, rings[0], off, n)
        expect(st == vc.S_OK and got == bytes(shadow.b[off:off + n]), f"indirect read {off}+{n}: status {st}")
    # Many requests in flight on both queues at once.
    heads = {r.index: [] for r in rings}
    for k in range(64):
        r = rings[k % 2]
        off = (k * 64 * 1024) % size
        h, _, _ = c.submit(r, vc.T_IN, off // 512, read_len=65536)
        heads[r.index].append(h)
    for r in rings:
        c.wait(r, heads[r.index])
    c.close()
    # A second front end finds the data.
    c2 = vc.Client(sock)
    r2 = c2.start(queues=1)
    shadow.verify(c2, r2[0])
    c2.close()
    ok(vm, "block-export-del", id="vb0")
    ref = os.path.join(d, "ref.raw")
    shadow.save(ref)
    ok(vm, "blockdev-del", node_name="disk")
    compare_raw(img, ref)
    # Read-only.
    ok(vm, "blockdev-add", driver="file", filename=img, node_name="ro", read_only=True)
    sock = export(vm, d, "ro", "vb1", writable=False)
    c = vc.Client(sock)
    ring = c.start()[0]
    expect(c.offered & (1 << vc.F_RO), "a read-only export offers VIRTIO_BLK_F_RO")
    expect(c.io(ring, vc.T_OUT, 0, data=b"x" * 512)[0] == vc.S_IOERR, "write to a read-only export")
    shadow.verify(c, ring)
    c.close()
    ok(vm, "block-export-del", id="vb1")


def healthy_check(c, ring, pattern):
    if c.read(ring, 0, len(pattern)) != pattern:
        raise Failure("the healthy front end read wrong data")
    c.write(ring, 1 * MiB, pattern)
    if c.read(ring, 1 * MiB, len(pattern)) != pattern:
        raise Failure("the healthy front end's write did not stick")


def hostile_cases(sock, mem_size=4 * MiB):
    """Each yields (name, function(client) -> outcome string)."""

    def outside(c):
        r = c.start()[0]
        h, st, _ = c.submit(r, vc.T_IN, 0, read_len=0, extra_out=None)
        # A read whose data buffer lies outside the guest's memory.
        hdr = c.mem.alloc(16, 16)
        c.mem.write(hdr, struct.pack("<IIQ", vc.T_IN, 0, 0))
        s = c.mem.alloc(1, 1)
        c.mem.write(s, b"\xff")
        (h2,) = c.submit_chain(r, [(hdr, 16, 0), (c.mem.size + 4096, 4096, vc.D_WRITE), (s, 1, vc.D_WRITE)])
        c.wait(r, [h, h2])
        got = c.mem.read(s, 1)[0]
        expect(got == vc.S_IOERR, f"data outside memory: status {got}")
        # The connection goes on.
        c.read(r, 0, 4096)
        return "IOERR, connection kept"

    def header_outside(c):
        r = c.start()[0]
        s = c.mem.alloc(1, 1)
        (h,) = c.submit_chain(r, [(1 << 40, 16, 0), (s, 1, vc.D_WRITE)])
        c.wait(r, [h])
        expect(c.mem.read(s, 1)[0] == vc.S_IOERR, "header outside memory")
        c.read(r, 0, 512)
        return "IOERR, connection kept"

    def no_status(c):
        r = c.start()[0]
        hdr = c.mem.alloc(16, 16)
        c.mem.write(hdr, struct.pack("<IIQ", vc.T_IN, 0, 0))
        c.submit_chain(r, [(hdr, 16, 0)])
        return dropped(c)

    def runaway_avail(c):
        r = c.start()[0]
        r.publish(0, bump=1000)
        return dropped(c)

    def queue_index(c):
        c.negotiate()
        c.set_mem_table()
        try:
            c.call(vc.SET_VRING_NUM, struct.pack("<II", 7, 128))
        except vc.VhostError:
            pass
        return dropped(c)

    def short_memfd(c):
        c.negotiate()
        small = os.memfd_create("short", 0)
        os.ftruncate(small, 4096)
        try:
            c.set_mem_table([(0, 1 << 30, vc.UVA_BASE, 0)], [small])
        except vc.VhostError:
            pass
        return dropped(c)

    def ring_outside(c):
        c.negotiate()
        c.set_mem_table()
        c.call(vc.SET_VRING_NUM, struct.pack("<II", 0, 128))
        c.call(vc.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 1 << 50, 1 << 50, 1 << 50, 0))
        k, call = os.eventfd(0), os.eventfd(0)
        try:
            c.call(vc.SET_VRING_CALL, struct.pack("<Q", 0), [call])
            c.call(vc.SET_VRING_KICK, struct.pack("<Q", 0), [k])
            c.call(vc.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        except vc.VhostError:
            pass
        return dropped(c)

    def desc_loop(c):
        r = c.start()[0]
        hdr = c.mem.alloc(16, 16)
        c.mem.write(hdr, struct.pack("<IIQ", vc.T_IN, 0, 0))
        r.put_desc(0, hdr, 16, vc.D_NEXT, 0)  # next points at itself
        r.publish(0)
        return dropped(c)

    def bad_index_desc(c):
        r = c.start()[0]
        r.publish(5000)  # a head beyond the queue
        return dropped(c)

    def garbage_message(c):
        c.sock.sendall(struct.pack("<III", 9999, 1, 8) + b"\xde\xad\xbe\xef" * 2)
        return dropped(c)

    def hangup_mid_request(c):
        r = c.start()[0]
        for k in range(32):
            c.submit(r, vc.T_IN, k * 128, read_len=65536)
        c.close()
        return "hung up with 32 reads in flight"

    def overlapping(c):
        r = c.start()[0]
        hdr = c.mem.alloc(16, 16)
        c.mem.write(hdr, struct.pack("<IIQ", vc.T_IN, 0, 0))
        buf = c.mem.alloc(4096)
        s = c.mem.alloc(1, 1)
        (h,) = c.submit_chain(r, [(hdr, 16, 0), (buf, 4096, vc.D_WRITE), (buf + 2048, 4096, vc.D_WRITE),
                                  (s, 1, vc.D_WRITE)])
        c.wait(r, [h])
        expect(c.mem.read(s, 1)[0] == vc.S_IOERR, "overlapping data descriptors")
        c.read(r, 0, 512)
        return "IOERR, connection kept"

    def oversized_write(c):
        r = c.start()[0]
        st, _ = c.io(r, vc.T_OUT, (mem_size // 512) - 1, data=b"y" * 4096)
        expect(st == vc.S_IOERR, f"write past the end: status {st}")
        st, _ = c.io(r, vc.T_IN, 0, read_len=100)
        expect(st == vc.S_IOERR, f"unaligned read: status {st}")
        return "IOERR"

    return [("data outside memory", outside), ("header outside memory", header_outside),
            ("no status byte", no_status), ("avail index runs away", runaway_avail),
            ("queue index out of range", queue_index), ("memfd shorter than its region", short_memfd),
            ("ring outside memory", ring_outside), ("descriptor loop", desc_loop),
            ("head index out of range", bad_index_desc), ("unknown message", garbage_message),
            ("hang-up mid-request", hangup_mid_request), ("request out of range", oversized_write),
            ("overlapping data descriptors", overlapping)]


def dropped(c, timeout=10):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not c.connected():
            return "connection dropped"
        time.sleep(0.05)
    raise Failure("the back end kept a connection it could not serve")


def case_hostile(vm, d):
    """Hostile front ends on one export while a healthy one on another does
    verified I/O between each: every bad input ends in an error status or a
    dropped connection; the healthy one, the service and a fresh connection
    to the hostile export go on."""
    size = 4 * MiB
    pattern = os.urandom(64 * 1024)
    good = raw_image(d, "good.raw", size)
    bad = raw_image(d, "bad.raw", size)
    ok(vm, "blockdev-add", driver="file", filename=good, node_name="good")
    ok(vm, "blockdev-add", driver="file", filename=bad, node_name="bad")
    gsock = export(vm, d, "good", "good")
    bsock = export(vm, d, "bad", "bad")
    g = vc.Client(gsock)
    gring = g.start()[0]
    g.write(gring, 0, pattern)
    for name, fn in hostile_cases(bsock, size):
        c = vc.Client(bsock)
        try:
            outcome = fn(c)
        except vc.Disconnected:
            outcome = "connection dropped"
        finally:
            c.close()
        print(f"{name}: {outcome}")
        healthy_check(g, gring, pattern)
        expect(ok(vm, "query-block-exports") is not None, "QMP answers")
    # The hostile export still serves a well-behaved front end.
    c = vc.Client(bsock)
    r = c.start()[0]
    c.write(r, 0, pattern)
    expect(c.read(r, 0, len(pattern)) == pattern, "the export attacked still works")
    c.close()
    g.close()
    ok(vm, "block-export-del", id="bad")
    ok(vm, "block-export-del", id="good")


def conversation(vm, d):
    """The block-export-add conversation both daemons get; returns replies."""
    out = []
    img = os.path.join(d, "conv.raw")
    if not os.path.exists(img):
        raw_image(d, "conv.raw", 4 * MiB)
    ok(vm, "blockdev-add", driver="file", filename=img, node_name="f")
    sock = lambda n: {"type": "unix", "path": os.path.join(d, n)}  # noqa: E731
    steps = [
        {"type": "vhost-user-blk", "id": "e1", "node-name": "f", "addr": sock("v1.sock"), "writable": True},
        {"type": "vhost-user-blk", "id": "e1", "node-name": "f", "addr": sock("v2.sock")},
        {"type": "vhost-user-blk", "id": "e2", "node-name": "nope", "addr": sock("v2.sock")},
        {"type": "vhost-user-blk", "id": "e3", "node-name": "f", "addr": sock("v3.sock"), "logical-block-size": 1000},
        {"type": "vhost-user-blk", "id": "e3", "node-name": "f", "addr": sock("v3.sock"), "logical-block-size": 256},
        {"type": "vhost-user-blk", "id": "e4", "node-name": "f", "addr": sock("v4.sock"), "num-queues": 0},
        {"type": "vhost-user-blk", "id": "e6", "node-name": "f"},
        {"type": "vhost-user-blk", "id": "e7", "node-name": "f", "addr": sock("v7.sock"), "bogus": 1},
        {"type": "vhost-user-blk", "id": "e8", "node-name": "f", "addr": sock("v8.sock"), "num-queues": 4,
         "logical-block-size": 4096},
    ]
    for s in steps:
        r = vm.raw("block-export-add", s)
        out.append(("add", s["id"], r.get("error", {}).get("desc", "ok")))
    out.append(("query", sorted((e["id"], e["node-name"], e["type"]) for e in ok(vm, "query-block-exports"))))
    for i in ("e8", "zz"):
        r = vm.raw("block-export-del", {"id": i})
        out.append(("del", i, r.get("error", {}).get("desc", "ok")))
    return out


def case_qsd(vm, d):
    """The same block-export-add conversation on qemu-storage-daemon 10 and
    sluice: replies and refusals compared; then the same verified I/O from
    the test front end on both daemons' exports of the same image (QSD's
    answers check the client), and the two images compared."""
    qd = os.path.join(d, "qsd")
    sd = os.path.join(d, "sluice")
    os.mkdir(qd)
    os.mkdir(sd)
    with qsd_monitor(qd) as q:
        theirs = conversation(q, qd)
        # Verified I/O on QSD's export (e1, writable), 1 queue.
        shadow_q = Shadow(4 * MiB)
        c, _ = verified_session(os.path.join(qd, "v1.sock"), shadow_q, 1, 300, 7)
        qcfg = c.config()
        qfeat = c.offered
        c.close()
        ok(q, "block-export-del", id="e1")
        time.sleep(0.3)
    ours = conversation(vm, sd)
    for a, b in zip(theirs, ours):
        print(f"qsd: {a}\nsluice: {b}")
    if theirs != ours:
        raise Failure(f"conversations differ:\nqsd:    {theirs}\nsluice: {ours}")
    shadow_s = Shadow(4 * MiB)
    c, _ = verified_session(os.path.join(sd, "v1.sock"), shadow_s, 1, 300, 7)
    scfg = c.config()
    sfeat = c.offered
    c.close()
    ok(vm, "block-export-del", id="e1")
    # The same feature bits that matter to a guest, the same config fields.
    mask = sum(1 << b for b in (vc.F_SEG_MAX, vc.F_RO, vc.F_BLK_SIZE, vc.F_FLUSH, vc.F_TOPOLOGY,
                                vc.F_CONFIG_WCE, vc.F_MQ, vc.F_DISCARD, vc.F_WRITE_ZEROES,
                                vc.F_INDIRECT, vc.F_EVENT_IDX, vc.F_VERSION_1))
    expect(qfeat & mask == sfeat & mask, f"features: qsd {qfeat & mask:#x} sluice {sfeat & mask:#x}")
    for name, lo, hi in (("capacity", 0, 8), ("seg_max", 12, 16), ("blk_size", 20, 24),
                         ("num_queues", 34, 36), ("max_discard_sectors", 36, 40),
                         ("max_discard_seg", 40, 44), ("max_write_zeroes_seg", 52, 56)):
        expect(qcfg[lo:hi] == scfg[lo:hi], f"config {name}: qsd {qcfg[lo:hi].hex()} sluice {scfg[lo:hi].hex()}")
    compare_raw(os.path.join(qd, "conv.raw"), os.path.join(sd, "conv.raw"))
    # Deliberate difference: QSD unlinks whatever is at the socket path, a
    # regular file included; sluice refuses to.
    victim = raw_image(sd, "precious.raw", 4096, b"k" * 4096)
    e = err(vm, "block-export-add", {"type": "vhost-user-blk", "id": "x", "node-name": "f",
                                     "addr": {"type": "unix", "path": victim}})
    expect("Failed to listen" in e and open(victim, "rb").read() == b"k" * 4096, f"socket over a file: {e}")


def case_spdk(vm, d):
    """SPDK's vhost_create_blk_controller / vhost_get_controllers /
    vhost_delete_controller through SPDK's own client; the controller's
    socket is in the runtime dir and serves verified I/O."""
    a = parse_args()
    rpc = JSONRPCClient(a.rpc)
    img = raw_image(d, "s.raw", 2 * MiB)
    rpc.call("bdev_aio_create", {"filename": img, "name": "s0", "block_size": 512})
    expect(rpc.call("vhost_create_blk_controller", {"ctrlr": "vhost.0", "dev_name": "s0"}) is True, "create")
    try:
        rpc.call("vhost_create_blk_controller", {"ctrlr": "vhost.0", "dev_name": "s0"})
        raise Failure("a second controller of the same name")
    except JSONRPCException as e:
        print("duplicate:", e.message.strip())
    try:
        rpc.call("vhost_create_blk_controller", {"ctrlr": "vhost.1", "dev_name": "nope"})
        raise Failure("a controller over a missing bdev")
    except JSONRPCException as e:
        print("missing bdev:", e.message.strip())
    ctrls = rpc.call("vhost_get_controllers")
    expect(len(ctrls) == 1 and ctrls[0]["ctrlr"] == "vhost.0", f"controllers: {ctrls}")
    expect(ctrls[0]["backend_specific"]["block"]["bdev"] == "s0", f"controllers: {ctrls}")
    sock = ctrls[0]["socket"]
    expect(os.path.dirname(sock) == os.path.dirname(a.rpc), f"socket {sock} not in the runtime dir")
    shadow = Shadow(2 * MiB)
    c, rings = verified_session(sock, shadow, 1, 200, 3)
    # Deleting while connected is refused, then works once the front end is gone.
    try:
        rpc.call("vhost_delete_controller", {"ctrlr": "vhost.0"})
        raise Failure("deleted a controller in use")
    except JSONRPCException as e:
        print("in use:", e.message.strip())
    c.close()
    # Once the front end is gone, the controller counts every request it
    # served (each went to the bdev): none lost between polls.
    t0 = time.time()
    while rpc.call("vhost_get_controllers")[0]["sessions"]:
        expect(time.time() - t0 < 10, "the session outlived its front end")
        time.sleep(0.05)
    done = rpc.call("vhost_get_controllers")[0]["completed_requests"]
    print("completed_requests:", done)
    expect(done == c.submitted, f"completed_requests {done}, {c.submitted} requests served")
    t0 = time.time()
    while True:
        try:
            rpc.call("vhost_delete_controller", {"ctrlr": "vhost.0"})
            break
        except JSONRPCException:
            if time.time() - t0 > 10:
                raise
            time.sleep(0.1)
    expect(rpc.call("vhost_get_controllers") == [], "controllers after delete")
    expect(not os.path.exists(sock), "socket left behind")
    rpc.call("bdev_aio_delete", {"name": "s0"})


def signalled_stream(c, ring, secs, depth=32):
    """Keeps `depth` 4 KiB reads in flight for `secs` (then lets them drain),
    reaping only when the call eventfd says so: (completions, signals,
    seconds). A signal never sent (or held back for good) fails it."""
    inflight, done, signals = {}, 0, 0
    rng = random.Random(5)
    t0 = time.time()
    t_end = t0 + secs

    def submit():
        head, st, _ = c.submit(ring, vc.T_IN, rng.randrange(0, 2 * MiB // 512 - 8), read_len=4096)
        inflight[head] = st

    for _ in range(depth):
        submit()
    while inflight:
        r, _, _ = select.select([ring.call], [], [], 5)
        if not r:
            raise Failure(f"no signal within 5 s with {len(inflight)} requests in flight "
                          f"({len(ring.reap())} of them used): a signal was lost")
        signals += os.eventfd_read(ring.call)
        for i, _n in ring.reap():
            ring.free.extend(ring.pending.pop(i, [i]))
            st = inflight.pop(i, None)
            expect(st is not None and c.mem.read(st, 1)[0] == vc.S_OK, f"read {i}: not in flight or failed")
            done += 1
            if time.time() < t_end:
                submit()
    return done, signals, time.time() - t0


def case_coalescing(vm, d):
    """SPDK's vhost_controller_set_coalescing: SPDK's defaults (off, 60000
    IOPS) and checks; with it off, a front end without EVENT_IDX hears of
    nearly every completion on its own; with it on (any rate above 100 IOPS
    delays), one signal covers many completions, and every held-back signal
    still comes (the stream's last batch waits on it alone)."""
    a = parse_args()
    rpc = JSONRPCClient(a.rpc)
    img = raw_image(d, "c.raw", 2 * MiB, fill=bytes(range(256)) * (2 * MiB // 256))
    rpc.call("bdev_aio_create", {"filename": img, "name": "c0", "block_size": 512})
    rpc.call("vhost_create_blk_controller", {"ctrlr": "co", "dev_name": "c0"})
    (ctrl,) = rpc.call("vhost_get_controllers", {"name": "co"})
    expect((ctrl["delay_base_us"], ctrl["iops_threshold"]) == (0, 60000), f"SPDK's defaults: {ctrl}")
    for bad in ({"ctrlr": "co", "delay_base_us": 10, "iops_threshold": 99},
                {"ctrlr": "nope", "delay_base_us": 10, "iops_threshold": 60000},
                {"ctrlr": "co", "delay_base_us": 10},
                {"ctrlr": "co", "delay_base_us": -1, "iops_threshold": 60000},
                {"ctrlr": "co", "delay_base_us": 4000000000, "iops_threshold": 60000}):
        try:
            rpc.call("vhost_controller_set_coalescing", bad)
            raise Failure(f"vhost_controller_set_coalescing {bad} accepted")
        except JSONRPCException as e:
            print("refused:", bad, e.message.strip())
    c = vc.Client(ctrl["socket"])
    (ring,) = c.start(queues=1, event_idx=False)
    # Off: one request at a time, each completion has its own signal.
    off = signalled_stream(c, ring, 0.5, depth=1)
    expect(off[1] == off[0], f"coalescing off: {off[1]} signals for {off[0]} completions")
    expect(rpc.call("vhost_controller_set_coalescing",
                    {"ctrlr": "co", "delay_base_us": 5000, "iops_threshold": 100}) is True, "set")
    (ctrl,) = rpc.call("vhost_get_controllers", {"name": "co"})
    expect((ctrl["delay_base_us"], ctrl["iops_threshold"]) == (5000, 100), f"set: {ctrl}")
    on = signalled_stream(c, ring, 1.0)
    per = lambda x: x[0] / max(1, x[1])  # noqa: E731
    print(f"off: {off[0]} completions, {off[1]} signals in {off[2]:.2f} s; "
          f"on: {on[0]} completions, {on[1]} signals in {on[2]:.2f} s")
    # On, 32 in flight: above the threshold the delay (5 ms per request over
    # one a window) is longer than the 10 ms window, which ends it: about a
    # signal per window, each covering most of the requests in flight.
    expect(on[1] / on[2] <= 150 and per(on) >= 8,
           f"coalescing on: {on[1] / on[2]:.0f} signals a second, {per(on):.1f} completions each")
    # Back off: signals follow completions again (from the next 10 ms window).
    rpc.call("vhost_controller_set_coalescing", {"ctrlr": "co", "delay_base_us": 0, "iops_threshold": 60000})
    time.sleep(0.05)
    back = signalled_stream(c, ring, 0.3, depth=1)
    expect(back[1] == back[0] and back[0] / back[2] > 150,
           f"coalescing off again: {back[1]} signals for {back[0]} completions in {back[2]:.2f} s")
    expect(c.read(ring, 0, 4096) == bytes(range(256)) * 16, "data after coalescing")
    c.close()
    t0 = time.time()
    while True:
        try:
            rpc.call("vhost_delete_controller", {"ctrlr": "co"})
            break
        except JSONRPCException:
            if time.time() - t0 > 10:
                raise
            time.sleep(0.1)
    rpc.call("bdev_aio_delete", {"name": "c0"})


def case_parked(vm, d):
    """A reactor that parks as soon as an iteration finds no work (the daemon
    runs with --park-after-us 0, one reactor): 12,800 verified 4 KiB reads
    at QD 32 in lockstep batches (one avail index update and one kick per
    batch, the next batch once the last is all back), EVENT_IDX on (the
    kick sent only when the server's avail_event asks for it), from a
    raw file on disk (the io_uring path) whose page cache is dropped every
    few batches, so that batches come back over several polls (some reads
    served from the cache at once, the others by the disk later) and the
    reactor parks in between with requests in flight; and a flush alone
    every 4 batches. Every batch and flush must be back within 5 s: a kick
    or a CQE a parked reactor sleeps through, or a signal not sent, fails
    it."""
    blocks, qd, batches = 4096, 32, 400
    img = os.path.join(d, "parked.raw")
    with open(img, "wb") as f:  # each 4 KiB block starts with its number
        for b in range(blocks):
            f.write(struct.pack("<Q", b) + bytes(4088))
        f.flush()
        os.fsync(f.fileno())  # clean pages, so that dropping them works
    ok(vm, "blockdev-add", driver="file", filename=img, node_name="pk", read_only=True)
    sock = export(vm, d, "pk", "parked", writable=False)
    wait_for_socket(sock)
    c = vc.Client(sock, mem_size=4 * MiB)
    (ring,) = c.start(queues=1, size=128)
    expect(c.features & (1 << vc.F_EVENT_IDX), "EVENT_IDX negotiated")
    m, rng = c.mem, random.Random(11)
    # Slot i: descriptors 3i (header), 3i+1 (data in), 3i+2 (status).
    hdr = [m.alloc(16, 16) for _ in range(qd)]
    din = [m.alloc(4096) for _ in range(qd)]
    st = [m.alloc(1, 1) for _ in range(qd)]
    for i in range(qd):
        ring.put_desc(3 * i, hdr[i], 16, vc.D_NEXT, 3 * i + 1)
        ring.put_desc(3 * i + 1, din[i], 4096, vc.D_WRITE | vc.D_NEXT, 3 * i + 2)
        ring.put_desc(3 * i + 2, st[i], 1, vc.D_WRITE)
    ring.pending = {}
    ring.free = [i for i in ring.free if i >= 3 * qd]  # the rest for c.submit
    fd = os.open(img, os.O_RDONLY)
    zeros = bytes(4088)
    kicks = 0
    try:
        for n in range(batches):
            if n % 4 == 0:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                # A flush alone (a request of another kind, kicked at once).
                head, fst, _ = c.submit(ring, vc.T_FLUSH)
                try:
                    c.wait(ring, [head], timeout=5)
                except vc.VhostError as e:
                    raise Failure(f"flush before batch {n}: {e}") from e
                expect(m.read(fst, 1)[0] == vc.S_OK, f"flush before batch {n}: status {m.read(fst, 1)[0]}")
            want = [rng.randrange(blocks) for _ in range(qd)]
            for i, b in enumerate(want):
                m.write(hdr[i], struct.pack("<IIQ", vc.T_IN, 0, b * 8))
                m.write(st[i], b"\xff")
                m.write(din[i], b"\xa5" * 8)
                m.write(ring.avail + 4 + 2 * (ring.avail_idx % ring.size), struct.pack("<H", 3 * i))
                ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
            m.write(ring.avail + 2, struct.pack("<H", ring.avail_idx))
            # Kick only when the server asked (EVENT_IDX's avail_event, as
            # Linux's virtqueue_kick_prepare: the index store, a full
            # barrier, then the load): a server that parks without
            # re-arming its avail_event is never kicked.
            vc.mb()
            (event,) = struct.unpack("<H", m.read(ring.used + 4 + 8 * ring.size, 2))
            new, old = ring.avail_idx, (ring.avail_idx - qd) & 0xFFFF
            if (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF:
                os.eventfd_write(ring.kick, 1)
                kicks += 1
            try:
                got = c.wait(ring, [3 * i for i in range(qd)], timeout=5)
            except vc.VhostError as e:
                raise Failure(f"batch {n} (after {n * qd} reads): {e}") from e
            ring.free = [i for i in ring.free if i >= 3 * qd]  # wait freed the slots' heads
            for i, b in enumerate(want):
                expect(got[3 * i] == 4097, f"batch {n} slot {i}: used length {got[3 * i]}")
                expect(m.read(st[i], 1)[0] == vc.S_OK, f"batch {n} slot {i}: status {m.read(st[i], 1)[0]}")
                data = m.read(din[i], 4096)
                expect(struct.unpack_from("<Q", data)[0] == b and data[8:] == zeros,
                       f"batch {n} slot {i}: block {b} read as block {struct.unpack_from('<Q', data)[0]}")
    finally:
        os.close(fd)
    print(f"{batches * qd} reads in {batches} batches, {kicks} kicks, {batches // 4} flushes; "
          f"{c.split_waits} waits with part of a batch back")
    # Without batches split over polls the case tested nothing of the kind.
    expect(c.split_waits > 0, "no batch came back over more than one signal")
    c.close()
    ok(vm, "block-export-del", id="parked")


def case_snapshot(vm, d):
    """An export of a qcow2 node follows it onto a snapshot overlay: writes
    after the snapshot land in the overlay, the base keeps the old data, and
    query-block-exports names the overlay."""
    base = os.path.join(d, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    ok(vm, "blockdev-add", driver="qcow2", node_name="base", file={"driver": "file", "filename": base})
    sock = export(vm, d, "base", "vs")
    shadow = Shadow(4 * MiB)
    c, rings = verified_session(sock, shadow, 1, 100, 5)
    before = bytes(shadow.b)
    top = os.path.join(d, "top.qcow2")
    ok(vm, "blockdev-snapshot-sync", node_name="base", snapshot_file=top, snapshot_node_name="top", format="qcow2")
    exports = ok(vm, "query-block-exports")
    expect(exports[0]["node-name"] == "top", f"export after snapshot: {exports}")
    shadow.io(c, rings, 100, random.Random(6))
    expect(c.io(rings[0], vc.T_FLUSH)[0] == vc.S_OK, "flush")
    shadow.verify(c, rings[0])
    c.close()
    ok(vm, "block-export-del", id="vs")
    ok(vm, "blockdev-del", node_name="top")
    ref_new, ref_old = os.path.join(d, "new.raw"), os.path.join(d, "old.raw")
    shadow.save(ref_new)
    with open(ref_old, "wb") as f:
        f.write(before)
    r = subprocess.run(["qemu-img", "check", top], capture_output=True, text=True)
    expect(r.returncode == 0, f"qemu-img check: {r.stdout}{r.stderr}")
    compare_raw(top, ref_new)
    compare_raw(base, ref_old)


if __name__ == "__main__":
    a = parse_args()
    vm = Vm(a.qmp)
    globals()["case_" + a.case](vm, a.dir)
    print("ok")

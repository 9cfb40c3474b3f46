"""A small vhost-user-blk front end for tests: it speaks vhost-user over the
Unix socket (messages, fds by SCM_RIGHTS), shares its "guest memory" as a
memfd, lays split virtqueues out in it, and issues virtio-blk requests. It
can also misbehave on purpose (bad descriptors, addresses outside memory,
out-of-range queue indexes, a runaway avail index, hang-ups mid-request).

Errors are raised as VhostError (never bare asserts): a test decides what it
expected.

Waiting for a completion follows the driver's side of virtio's "publish,
then re-check" rule (virtio 1.2 2.7.10, Linux's virtqueue_enable_cb_delayed):
store `used_event`, a full memory barrier (`mb`), then read `used.idx`
again before sleeping on the call eventfd. Without the barrier the CPU may
satisfy the read before the store is visible (x86 reorders a store with a
later load), the device may read the old `used_event` after publishing,
rightly send no signal, and the front end sleeps with its completions in
the ring."""

import mmap
import os
import select
import socket
import struct
import threading

# Front-end requests.
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25

VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8

F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_MQ = 2, 5, 6, 9, 10, 11, 12
F_DISCARD, F_WRITE_ZEROES, F_INDIRECT, F_EVENT_IDX, F_PROTOCOL, F_VERSION_1 = 13, 14, 28, 29, 30, 32
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4

UVA_BASE = 0x7F00_0000_0000  # the "front end's" virtual address of guest address 0


class VhostError(Exception):
    pass


_FENCE = threading.Lock()


def mb():
    """A full memory barrier: this thread's stores before it are visible
    before its loads after it (virtio_mb). Python has no fence of its own;
    taking and releasing a lock runs locked read-modify-write instructions
    (glibc's semaphore or CPython's mutex), each a full barrier on x86-64,
    where these tests run."""
    with _FENCE:
        pass


class Disconnected(VhostError):
    pass


class Ring:
    """A split virtqueue in guest memory."""

    def __init__(self, mem, index, base, size):
        self.mem, self.index, self.size = mem, index, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(size))
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    def put_desc(self, i, addr, length, flags, nxt=0):
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head, bump=1):
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + bump) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def arm_call(self):
        """EVENT_IDX: asks for a call once the next entry is used, then looks
        again, across a full barrier (see the module doc). True when nothing
        was used meanwhile, so sleeping on the call eventfd is safe."""
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", self.used_seen))
        mb()  # the store above before the load below
        return self.used_idx() == self.used_seen

    def sleep_on_call(self, timeout):
        """Waits at most `timeout` s for a call (after `arm_call`); whether one came."""
        r, _, _ = select.select([self.call], [], [], timeout)
        if not r:
            return False
        try:
            os.eventfd_read(self.call)
        except BlockingIOError:
            pass
        return True

    def reap(self):
        """(id, len) of every newly used chain."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            e = self.used + 4 + 8 * (self.used_seen % self.size)
            out.append(struct.unpack("<II", self.mem.read(e, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Memory:
    """The shared "guest memory": one memfd, mapped here too."""

    def __init__(self, size):
        self.size = size
        self.fd = os.memfd_create("vhost-test-guest", 0)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.next = 0x10000  # data buffers from here; rings below

    def write(self, addr, b):
        self.map[addr:addr + len(b)] = b

    def read(self, addr, n):
        return bytes(self.map[addr:addr + n])

    def alloc(self, n, align=4096):
        a = (self.next + align - 1) & ~(align - 1)
        if a + n > self.size:
            a = 0x10000  # wrap: tests keep few buffers alive at once
        self.next = a + n
        return a


class Client:
    def __init__(self, path, mem_size=16 << 20):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.mem = Memory(mem_size)
        self.rings = []
        self.features = 0
        self.reply_ack = False
        self.submitted = 0  # chains queued by submit / submit_chain
        self.split_waits = 0  # sleeps of `wait` with part of its heads used

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # --- messages -----------------------------------------------------------
    def send(self, req, payload=b"", fds=(), need_reply=False):
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        msg = struct.pack("<III", req, flags, len(payload)) + payload
        try:
            if fds:
                socket.send_fds(self.sock, [msg], list(fds))
            else:
                self.sock.sendall(msg)
        except OSError as e:
            raise Disconnected(f"send {req}: {e}") from e

    def recv(self, req):
        hdr = self._recv_exact(12)
        r, flags, size = struct.unpack("<III", hdr)
        if r != req or not flags & REPLY:
            raise VhostError(f"reply to {req}: got request {r} flags {flags:#x}")
        return self._recv_exact(size)

    def _recv_exact(self, n):
        b = b""
        while len(b) < n:
            try:
                c = self.sock.recv(n - len(b))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Disconnected(str(e)) from e
            except socket.timeout as e:
                raise VhostError("no reply within 20 s") from e
            if not c:
                raise Disconnected("the back end hung up")
            b += c
        return b

    def call(self, req, payload=b"", fds=()):
        """A message acknowledged with REPLY_ACK where negotiated."""
        self.send(req, payload, fds, need_reply=self.reply_ack)
        if self.reply_ack:
            (v,) = struct.unpack("<Q", self.recv(req))
            if v != 0:
                raise VhostError(f"request {req} refused ({v})")

    def get_u64(self, req):
        self.send(req)
        return struct.unpack("<Q", self.recv(req))[0]

    def connected(self):
        """Whether the back end still holds the connection (it answers GET_FEATURES)."""
        try:
            self.get_u64(GET_FEATURES)
            return True
        except VhostError:
            return False

    # --- set-up -----------------------------------------------------------------
    def negotiate(self, want=None, event_idx=True):
        offered = self.get_u64(GET_FEATURES)
        self.offered = offered
        if want is None:
            want = offered & ((1 << F_VERSION_1) | (1 << F_PROTOCOL) | (1 << F_FLUSH) | (1 << F_BLK_SIZE)
                              | (1 << F_DISCARD) | (1 << F_WRITE_ZEROES) | (1 << F_MQ) | (1 << F_SEG_MAX)
                              | (1 << F_RO) | (1 << F_CONFIG_WCE) | (1 << F_INDIRECT)
                              | ((1 << F_EVENT_IDX) if event_idx else 0))
        self.send(SET_OWNER)
        if offered & (1 << F_PROTOCOL):
            pf = self.get_u64(GET_PROTOCOL_FEATURES)
            use = pf & (PF_MQ | PF_REPLY_ACK | PF_CONFIG)
            self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", use))
            self.reply_ack = bool(use & PF_REPLY_ACK)
            self.protocol = use
        self.features = want
        self.call(SET_FEATURES, struct.pack("<Q", want))
        return offered

    def queue_num(self):
        return self.get_u64(GET_QUEUE_NUM)

    def config(self, size=60):
        self.send(GET_CONFIG, struct.pack("<III", 0, size, 0) + bytes(size))
        return self.recv(GET_CONFIG)[12:]

    def capacity(self):
        return struct.unpack("<Q", self.config()[0:8])[0] * 512

    def set_mem_table(self, regions=None, fds=None):
        """Default: the whole memfd as one region at guest address 0."""
        if regions is None:
            regions = [(0, self.mem.size, UVA_BASE, 0)]
            fds = [self.mem.fd]
        p = struct.pack("<II", len(regions), 0)
        for gpa, size, uva, off in regions:
            p += struct.pack("<QQQQ", gpa, size, uva, off)
        self.call(SET_MEM_TABLE, p, fds)

    def setup_ring(self, index, size=128, base=None):
        if base is None:
            base = 0x1000 + 0x4000 * len(self.rings)
        r = Ring(self.mem, index, base, size)
        self.call(SET_VRING_NUM, struct.pack("<II", index, size))
        self.call(SET_VRING_BASE, struct.pack("<II", index, 0))
        self.call(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, UVA_BASE + r.desc, UVA_BASE + r.used,
                                              UVA_BASE + r.avail, 0))
        self.call(SET_VRING_CALL, struct.pack("<Q", index), [r.call])
        self.call(SET_VRING_KICK, struct.pack("<Q", index), [r.kick])
        if self.features & (1 << F_PROTOCOL):
            self.call(SET_VRING_ENABLE, struct.pack("<II", index, 1))
        self.rings.append(r)
        return r

    def start(self, queues=1, size=128, event_idx=True):
        self.negotiate(event_idx=event_idx)
        self.set_mem_table()
        return [self.setup_ring(i, size) for i in range(queues)]

    # --- requests ----------------------------------------------------------------
    def submit(self, ring, rtype, sector=0, data=None, read_len=0, status_addr=None, extra_out=None):
        """Queues one request (header, data, status) and kicks; returns
        (head, status address, data-in address)."""
        m = self.mem
        hdr = m.alloc(16, 16)
        m.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        descs = [(hdr, 16, 0)]
        if data is not None:
            a = m.alloc(len(data))
            m.write(a, data)
            descs.append((a, len(data), 0))
        if extra_out is not None:
            descs.append(extra_out)
        din = None
        if read_len:
            din = m.alloc(read_len)
            m.write(din, b"\xa5" * read_len)
            descs.append((din, read_len, D_WRITE))
        if status_addr is None:
            status_addr = m.alloc(1, 1)
            m.write(status_addr, b"\xff")
        descs.append((status_addr, 1, D_WRITE))
        return self.submit_chain(ring, descs) + (status_addr, din)

    def submit_chain(self, ring, descs):
        """Queues a raw chain of (addr, len, flags) and kicks; returns (head,)."""
        if len(ring.free) < len(descs):
            raise VhostError("ring full")
        ids = [ring.free.pop(0) for _ in descs]
        for k, (a, n, f) in enumerate(descs):
            last = k == len(descs) - 1
            ring.put_desc(ids[k], a, n, f | (0 if last else D_NEXT), 0 if last else ids[k + 1])
        ring.pending = getattr(ring, "pending", {})
        ring.pending[ids[0]] = ids
        self.submitted += 1
        ring.publish(ids[0])
        return (ids[0],)

    def wait(self, ring, heads, timeout=20):
        """Waits until every head in `heads` is used; returns {head: used len}."""
        want, got = set(heads), {}
        while want - set(got):
            for i, n in ring.reap():
                got[i] = n
                ring.free.extend(ring.pending.pop(i, [i]))
            if not want - set(got):
                break
            if not ring.arm_call():
                continue
            if got:
                self.split_waits += 1
            if not ring.sleep_on_call(timeout):
                raise VhostError(f"no completion of {sorted(want - set(got))} within {timeout}s")
        return got

    def io(self, ring, rtype, sector=0, data=None, read_len=0):
        """One request, waited for: (status, data read)."""
        head, st, din = self.submit(ring, rtype, sector, data, read_len)
        self.wait(ring, [head])
        status = self.mem.read(st, 1)[0]
        return status, (self.mem.read(din, read_len) if din is not None else None)

    def read(self, ring, offset, n):
        st, d = self.io(ring, T_IN, offset // 512, read_len=n)
        if st != S_OK:
            raise VhostError(f"read {offset}+{n}: status {st}")
        return d

    def write(self, ring, offset, data):
        st, _ = self.io(ring, T_OUT, offset // 512, data=data)
        if st != S_OK:
            raise VhostError(f"write {offset}+{len(data)}: status {st}")

    def range_op(self, ring, rtype, offset, n, flags=0):
        seg = struct.pack("<QII", offset // 512, n // 512, flags)
        st, _ = self.io(ring, rtype, 0, data=seg)
        return st

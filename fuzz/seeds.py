#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpora (fuzz/corpus/<target>/seed-*):
qcow2 images made by qemu-img (several layouts, data, zero and compressed
clusters, backing names), NBD client and server byte streams as QEMU's client
and server speak them (fixed newstyle, structured replies, base:allocation,
then requests and replies), JSON-RPC and QMP requests as SPDK's and
qemu.qmp's clients send them, vhost-user-blk front ends' message streams (QEMU's
handshake order) and guests' virtqueues (read, write, flush, get-id, discard,
write-zeroes, indirect tables, and chains a device must refuse). Run from anywhere; needs qemu-img and qemu-io."""

import os
import struct
import subprocess
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)


def qcow2_seeds():
    with tempfile.TemporaryDirectory() as t:
        imgs = {
            "plain-4k": (["-o", "cluster_size=4096"], "64K", ["write -P 0x11 0 8k"]),
            "v2-512": (["-o", "compat=0.10,cluster_size=512"], "32K", ["write -P 0x22 1k 2k"]),
            "zero-512": (["-o", "cluster_size=512"], "32K",
                         ["write -P 0x33 0 1k", "write -z 4k 2k", "discard 512 512"]),
            "refbits1-512": (["-o", "cluster_size=512,refcount_bits=1"], "16K", ["write -P 1 0 512"]),
            "refbits64-512": (["-o", "cluster_size=512,refcount_bits=64"], "16K", ["write -P 2 0 512"]),
            "lazy-1k": (["-o", "cluster_size=1024,lazy_refcounts=on"], "32K", ["write -P 3 2k 1k"]),
            "backing-512": (["-o", "cluster_size=512", "-b", "/nonexistent/base.raw", "-F", "raw", "-u"],
                            "16K", []),
            "zstd-4k": (["-o", "cluster_size=4096,compression_type=zstd"], "32K", []),
        }
        for name, (opts, size, io) in imgs.items():
            p = os.path.join(t, name)
            run("qemu-img", "create", "-q", "-f", "qcow2", *opts, p, size)
            for c in io:
                run("qemu-io", "-f", "qcow2", "-c", c, p)
            if name == "zstd-4k":
                raw = p + ".raw"
                with open(raw, "wb") as f:
                    f.write(b"\x44" * 8192 + bytes(range(256)) * 16)
                run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
                    "cluster_size=4096,compression_type=zstd", "-f", "raw", raw, p)
            with open(p, "rb") as f:
                data = f.read()
            if len(data) <= 65536:
                put("qcow2_image", name, data)
            cs = 1 << struct.unpack(">I", data[20:24])[0]
            put("qcow2_header", name, struct.pack("<Q", len(data)) + data[:min(cs, 4096)])
            l1 = struct.unpack(">Q", data[40:48])[0]
            rt = struct.unpack(">Q", data[48:56])[0]
            l2 = struct.unpack(">Q", data[l1:l1 + 8])[0] & 0x00FFFFFFFFFFFE00 if l1 else 0
            bits = cs.bit_length() - 1
            order = struct.unpack(">I", data[96:100])[0] if data[7] == 3 else 4
            rb = struct.unpack(">Q", data[rt:rt + 8])[0]
            for what, off in (("l2", l2), ("refblock", rb)):
                if off and off + cs <= len(data):
                    put("qcow2_tables", f"{name}-{what}",
                        bytes([(bits - 9) | (0x80 if data[7] == 3 else 0), order]) + data[off:off + min(cs, 1024)])


def opt(o, data=b""):
    return struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data


def req(flags, ty, cookie, off, ln, data=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, ty, cookie, off, ln) + data


def nbd_server_seeds():
    meta = struct.pack(">I", 2) + b"m0" + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
    go = struct.pack(">I", 2) + b"m0" + struct.pack(">H", 1) + struct.pack(">H", 3)
    hs = struct.pack(">I", 3) + opt(8) + opt(10, meta) + opt(7, go)
    put("nbd_server", "handshake-only", hs)
    put("nbd_server", "list-info-abort", struct.pack(">I", 3) + opt(3) + opt(6, go) + opt(2))
    put("nbd_server", "export-name", struct.pack(">I", 1) + opt(1, b"m0"))
    put("nbd_server", "starttls-unknown", struct.pack(">I", 3) + opt(5) + opt(99, b"xx") + opt(2))
    io = (req(0, 1, 1, 0, 4096, b"\xab" * 4096) + req(1, 1, 2, 8192, 512, b"\xcd" * 512)
          + req(0, 0, 3, 0, 4096) + req(4, 0, 4, 4096, 8192) + req(0, 3, 5, 0, 0)
          + req(0, 4, 6, 0, 4096) + req(2, 6, 7, 4096, 4096) + req(0, 7, 8, 0, 1 << 20)
          + req(0, 5, 9, 0, 0) + req(0, 2, 10, 0, 0))
    put("nbd_server", "transmission", hs + io)
    put("nbd_server", "bad-request", hs + req(0, 0, 1, 1 << 40, 4096) + req(0, 99, 2, 0, 0)
        + req(0, 1, 3, 1023 * 1024, 4096, b"\0" * 4096))


def rep(o, ty, data=b""):
    return struct.pack(">QIII", 0x3E889045565A9, o, ty, len(data)) + data


def nbd_client_seeds():
    hello = struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3)
    info = struct.pack(">HQH", 0, 1 << 20, 1 | 4 | 8 | 32 | 64 | 256)
    hs = (hello + rep(8, 1) + rep(10, 4, struct.pack(">I", 1) + b"base:allocation") + rep(10, 1)
          + rep(7, 3, info) + rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 1 << 25)) + rep(7, 1))
    put("nbd_client", "handshake", hs)
    data = struct.pack(">IHHQI", 0x668E33EF, 1, 1, 1, 8 + 4096) + struct.pack(">Q", 0) + b"\x5a" * 4096
    status = struct.pack(">IHHQI", 0x668E33EF, 1, 5, 2, 4 + 16) + struct.pack(">IIIII", 1, 65536, 0, 1 << 20, 3)[:20]
    flush = struct.pack(">IQ", 0x67446698, 0) + struct.pack(">Q", 3)
    put("nbd_client", "replies", hs + data + status + flush)
    err = struct.pack(">IHHQI", 0x668E33EF, 1, 32769, 1, 6) + struct.pack(">IH", 5, 0)
    put("nbd_client", "error-reply", hs + err)
    put("nbd_client", "refused", hello + rep(8, 1) + rep(10, 1) + rep(7, 0x80000006, b"no such export"))
    put("nbd_client", "oldstyle", struct.pack(">QQQI", 0x4E42444D41474943, 0x00420281861253, 1 << 20, 1) + b"\0" * 124)


def json_seeds():
    reqs = [
        b'{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1}',
        b'{"jsonrpc": "2.0", "method": "bdev_malloc_create", "params": {"name": "m0", "num_blocks": 64, '
        b'"block_size": 512}, "id": 2}\n[{"jsonrpc":"2.0","method":"x","params":[1,2.5e-3,-0,true,null]}]',
        b'{"a":"\\u00e9\\ud83d\\ude00\\n","b":[[],{}],"c":-12.5E+7}{"id":3}',
        b'{"jsonrpc":"2.0","method":"spdk_get_version","id":"abc"}\r\n garbage\n{"id":4}',
    ]
    for i, r in enumerate(reqs):
        put("rpc_framing", f"req{i}", bytes([i * 17 % 64]) + r)
    qmp = [
        b'{ "execute": "qmp_capabilities" }',
        b'{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q0",'
        b'"file":{"driver":"file","filename":"/tmp/x.qcow2"},"read-only":false}}',
        b"{'execute': 'query-block-jobs', 'id': 'x'}\n{\"exec-oob\": \"x\"} [1, 2, {}]",
        b'{"execute":"block-stream","arguments":{"device":"vd0","speed":1e3,"base":null}}\xff{',
        b'{"a": "\\u0000\\t\\"", "b": -0.5, "c": 12345678901234567890}',
    ]
    for i, r in enumerate(qmp):
        put("qmp_json", f"cmd{i}", bytes([i * 13 % 64]) + r)


# virtio-blk and vhost-user (the vhost_user and vublk_virtqueue targets).
VQ_DESC, VQ_AVAIL, VQ_USED = 0x0, 0x400, 0x800
D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4


def blk_hdr(ty, sector=0):
    return struct.pack("<IIQ", ty, 0, sector)


def ring_image(chains, size=16, base=0, extra=()):
    """A guest memory image: `chains` (lists of (addr, len, flags) with
    D_NEXT filled in) in the descriptor table from entry 0 on, offered in the
    avail ring from `base`; `extra` are (addr, bytes) put in memory."""
    descs, heads = [], []
    for c in chains:
        heads.append(len(descs))
        for i, (a, ln, fl) in enumerate(c):
            nxt = len(descs) + 1 if i + 1 < len(c) else 0
            descs.append((a, ln, fl | (D_NEXT if i + 1 < len(c) else 0), nxt))
    if len(descs) > size:
        raise ValueError(f"{len(descs)} descriptors on a ring of {size}")
    mem = bytearray(VQ_USED)
    for i, (a, ln, fl, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, VQ_DESC + 16 * i, a, ln, fl, nxt)
    struct.pack_into("<HH", mem, VQ_AVAIL, 0, (base + len(heads)) & 0xFFFF)
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, VQ_AVAIL + 4 + 2 * ((base + k) % size), h)
    for a, b in extra:
        if len(mem) < a + len(b):
            mem.extend(bytes(a + len(b) - len(mem)))
        mem[a:a + len(b)] = b
    return bytes(mem)


def blk_requests():
    """Chains of one of each request QEMU's virtio-blk driver sends, with their headers and data."""
    hdrs = [(0x1000, blk_hdr(0, 8)), (0x1020, blk_hdr(1, 16)), (0x1040, blk_hdr(4)),
            (0x1060, blk_hdr(8)), (0x1080, blk_hdr(11)), (0x10a0, struct.pack("<QII", 64, 8, 0)),
            (0x10c0, blk_hdr(13)), (0x10e0, struct.pack("<QII", 128, 8, 1)), (0x4000, b"\xab" * 4096)]
    chains = [
        [(0x1000, 16, 0), (0x2000, 4096, D_WRITE), (0x1800, 1, D_WRITE)],   # read 4 KiB at sector 8
        [(0x1020, 16, 0), (0x4000, 4096, 0), (0x1801, 1, D_WRITE)],         # write at sector 16
        [(0x1040, 16, 0), (0x1802, 1, D_WRITE)],                            # flush
        [(0x1060, 16, 0), (0x3000, 20, D_WRITE), (0x1803, 1, D_WRITE)],     # get-id
    ]
    zap = [
        [(0x1080, 16, 0), (0x10a0, 16, 0), (0x1804, 1, D_WRITE)],           # discard
        [(0x10c0, 16, 0), (0x10e0, 16, 0), (0x1805, 1, D_WRITE)],           # write-zeroes, may unmap
    ]
    return chains, zap, hdrs


def vublk_virtqueue_seeds():
    def put_vq(name, flags, size, base, image):
        put("vublk_virtqueue", name, struct.pack("<BBH", flags, size.bit_length() - 1, base) + image)

    chains, zap, hdrs = blk_requests()
    put_vq("read-write-flush-getid", 0, 16, 0, ring_image(chains, extra=hdrs))
    put_vq("discard-write-zeroes", 0, 16, 0, ring_image(zap, extra=hdrs))
    put_vq("event-idx-wrap", 1, 16, 0xFFFE, ring_image(chains, base=0xFFFE, extra=hdrs))
    put_vq("read-only-writethrough", 2 | 4, 16, 0, ring_image(chains + zap[:1], extra=hdrs))
    # One indirect descriptor naming a table of a read's three.
    table = b"".join(struct.pack("<QIHH", a, ln, fl | (D_NEXT if i < 2 else 0), i + 1)
                     for i, (a, ln, fl) in enumerate(chains[0]))
    put_vq("indirect", 0, 4, 0, ring_image([[(0x5000, len(table), D_INDIRECT)]], size=4,
                                           extra=hdrs + [(0x5000, table)]))
    # A read into the buffer that crosses from region A into region B.
    put_vq("cross-region", 0, 8, 0, ring_image([[(0x1000, 16, 0), (0xF800, 0x1000, D_WRITE), (0x1800, 1, D_WRITE)]],
                                               size=8, extra=hdrs))
    bad = [
        [(0x1100, 16, 0), (0x1806, 1, D_WRITE)],                            # unknown type 99
        [(0x1120, 16, 0), (0x2000, 512, D_WRITE), (0x1807, 1, D_WRITE)],    # sector far past the end
        [(0x1000, 16, 0), (0x20000, 512, D_WRITE), (0x1808, 1, D_WRITE)],   # buffer outside memory
        [(0x1000, 8, 0), (0x1809, 1, D_WRITE)],                             # header too short
        [(0x1000, 16, 0), (0x2000, 0xFFFFFFF0, D_WRITE), (0x180a, 1, D_WRITE)],  # huge length
        [(0x1000, 16, D_WRITE), (0x2000, 512, 0), (0x180b, 1, D_WRITE)],    # wrong directions
        [(0x1000, 16, 0), (0x2000, 512, 0)],                                # no status byte
    ]
    extra = hdrs + [(0x1100, blk_hdr(99)), (0x1120, blk_hdr(0, 1 << 60))]
    put_vq("bad-chains", 0, 32, 0, ring_image(bad, size=32, extra=extra))
    loop = bytearray(ring_image([[(0x1000, 16, 0), (0x1810, 1, D_WRITE)]], size=2, extra=hdrs))
    struct.pack_into("<HH", loop, VQ_DESC + 16 + 12, D_WRITE | D_NEXT, 0)  # status -> header -> status ...
    put_vq("loop", 0, 2, 0, bytes(loop))
    put_vq("too-far-ahead", 0, 4, 0, ring_image([c[:2] for c in chains[:2]], size=4,
                                                extra=hdrs + [(VQ_AVAIL + 2, struct.pack("<H", 9))]))


def vu_msg(code, body=b"", flags=1):
    return struct.pack("<III", code, flags, len(body)) + body


def vu_frame(msg, fds="", inits=()):
    """A vhost_user frame: `fds` is a string of 'm' (a memfd, contents from
    `inits` in order) and 'e' (an eventfd)."""
    kinds = len(fds) | sum(4 << i for i, k in enumerate(fds) if k == "m")
    out = bytes([kinds]) + struct.pack("<H", len(msg)) + msg
    inits = list(inits)
    for k in fds:
        if k == "m":
            init = inits.pop(0)
            out += struct.pack("<H", len(init)) + init
    return out


def vhost_user_seeds():
    feats = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 12) | (1 << 11) | (1 << 10) | (1 << 9) | (1 << 6) | (1 << 2)
    uva = 0x7F00_0000_0000
    q = lambda code, body=b"": vu_frame(vu_msg(code, body))
    state = lambda i, n: struct.pack("<II", i, n)
    hello = (q(1) + q(15) + q(16, struct.pack("<Q", 1 | (1 << 9))) + q(17) + q(3)
             + q(24, struct.pack("<III", 0, 60, 0) + bytes(60)))

    def setup(features, image, size=32, enable=True):
        table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x10000, uva, 0)
        return (q(2, struct.pack("<Q", features))
                + vu_frame(vu_msg(5, table), "m", [image])
                + q(8, state(0, size)) + q(10, state(0, 0))
                + q(9, struct.pack("<IIQQQQ", 0, 0, uva + VQ_DESC, uva + VQ_USED, uva + VQ_AVAIL, 0))
                + vu_frame(vu_msg(12, struct.pack("<Q", 0)), "e")
                + vu_frame(vu_msg(13, struct.pack("<Q", 0)), "e")
                + (q(18, state(0, 1)) if enable else b""))

    chains, zap, hdrs = blk_requests()
    image = ring_image(chains + zap, size=32, extra=hdrs)
    put("vhost_user", "handshake-only", hello + setup(feats, ring_image([], size=32)))
    put("vhost_user", "handshake-requests-stop",
        hello + setup(feats, image) + q(11, state(0, 0)) + q(25, struct.pack("<III", 32, 1, 0) + b"\0"))
    put("vhost_user", "event-idx-need-reply-reset",
        hello + setup(feats | (1 << 29), image)
        + vu_frame(vu_msg(18, state(0, 0), flags=1 | 8)) + q(4))
    put("vhost_user", "second-queue-and-new-table",
        hello + setup(feats, image) + q(8, state(1, 8))
        + vu_frame(vu_msg(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x10000, uva, 0)), "m", [image])
        + q(11, state(0, 0)))
    put("vhost_user", "refused",
        hello + q(8, state(7, 16)) + q(2, struct.pack("<Q", 1 << 63)) + vu_frame(vu_msg(5, b"\0" * 8), "ee"))


if __name__ == "__main__":
    qcow2_seeds()
    nbd_server_seeds()
    nbd_client_seeds()
    json_seeds()
    vublk_virtqueue_seeds()
    vhost_user_seeds()

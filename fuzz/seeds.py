#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpora (fuzz/corpus/<target>/seed-*):
qcow2 images made by qemu-img (several layouts, data, zero and compressed
clusters, backing names), NBD client and server byte streams as QEMU's client
and server speak them (fixed newstyle, structured replies, base:allocation,
then requests and replies), JSON-RPC and QMP requests as SPDK's and
qemu.qmp's clients send them. Run from anywhere; needs qemu-img and qemu-io."""

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


if __name__ == "__main__":
    qcow2_seeds()
    nbd_server_seeds()
    nbd_client_seeds()
    json_seeds()

"""sluice's NBD client (blockdev-add driver nbd, backing files on NBD servers)
end to end: against qemu-nbd, against qemu-storage-daemon's NBD export and
against sluice's own server; QEMU's answers compared with QSD's; data judged
on the server's side by qemu-img / qemu-io; block status compared with
qemu-img map; a stream over NBD that skips holes; reconnection; a fake server
answering garbage."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

from spdk.rpc.client import JSONRPCClient
from stream_common import parse_args, run_case, qsd_monitor

MiB = 1 << 20


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def run(*cmd, ok=True):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120)
    if ok and (r.returncode != 0 or "verification failed" in r.stdout):
        raise Mismatch(f"{' '.join(map(str, cmd))}: {r.stdout}{r.stderr}")
    return r


def wait_path(p, proc=None):
    deadline = time.time() + 10
    while not os.path.exists(p):
        if proc is not None and proc.poll() is not None:
            raise Mismatch(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.time() > deadline:
            raise Mismatch(f"{p} never appeared")
        time.sleep(0.02)


def qemu_nbd(sock, img, fmt="raw", export="exp", extra=()):
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(["qemu-nbd", "-f", fmt, "-k", sock, "-x", export, "-t",
                          *extra, img], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_path(sock, p)
    return p


def unix(path):
    return {"type": "unix", "path": path}


def sluice_export(vm, d, node, name):
    """Exports `node` on sluice's own NBD server (started once); returns the URI."""
    sock = os.path.join(d, "sluice-nbd.sock")
    if not os.path.exists(sock):
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": name, "node-name": node, "writable": True})
    return f"nbd+unix:///{name}?socket={sock}"


def mapped(uri_or_path, fmt="raw"):
    """qemu-img map as (start, length, data, zero) tuples, adjacent equal extents merged."""
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, uri_or_path).stdout)
    res = []
    for e in out:
        t = [e["start"], e["length"], e["data"], e["zero"]]
        if res and res[-1][2:] == t[2:] and res[-1][0] + res[-1][1] == t[0]:
            res[-1][1] += t[1]
        else:
            res.append(t)
    return res


def data_round_trip(vm, d, server_img, server_uri_opts, node):
    """Adds the nbd node, exports it on sluice's server, writes and reads
    through it with qemu-io, and judges the server's image."""
    vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": node, **server_uri_opts})
    uri = sluice_export(vm, d, node, node)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", "-c", "write -P 0x4d 3M 512k",
        "-c", "write -z 5M 1M", "-c", "flush", "-c", "write -f -P 0x7e 6M 64k", uri)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 1M", "-c", "read -P 0x4d 3M 512k",
        "-c", "read -P 0 5M 1M", "-c", "read -P 0x7e 6M 64k", uri)
    # Many requests in flight at once (aio), verified.
    run("qemu-io", "-f", "raw", "-c", "aio_write -P 0x21 8M 64k", "-c", "aio_write -P 0x22 9M 64k",
        "-c", "aio_write -P 0x23 10M 64k", "-c", "aio_flush", uri)
    vm.rcmd("block-export-del", {"id": node})
    return uri


def check_server_image(img, fmt="raw", opts=()):
    run("qemu-io", "-f", fmt, *opts, "-c", "read -P 0x3c 0 1M", "-c", "read -P 0x4d 3M 512k",
        "-c", "read -P 0 5M 1M", "-c", "read -P 0x7e 6M 64k", "-c", "read -P 0x21 8M 64k",
        "-c", "read -P 0x22 9M 64k", "-c", "read -P 0x23 10M 64k", img)


def case_qemu_nbd(vm, d):
    img = os.path.join(d, "srv.raw")
    run("qemu-img", "create", "-f", "raw", img, "16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 12M 1M", img)
    sock = os.path.join(d, "qn.sock")
    p = qemu_nbd(sock, img)
    try:
        uri = data_round_trip(vm, d, img, {"server": unix(sock), "export": "exp"}, "n0")
        nodes = {n["node-name"]: n for n in vm.rcmd("query-named-block-nodes")}
        n0 = nodes["n0"]
        expect(n0["drv"] == "nbd", n0)
        expect(n0["file"] == f"nbd+unix:///exp?socket={sock}", n0)
        expect(n0["image"]["virtual-size"] == 16 * MiB, n0)
        # Block status through sluice's client equals the server image's map.
        vm.rcmd("block-export-add", {"type": "nbd", "id": "m0", "node-name": "n0", "name": "m0"})
        got = mapped(uri.replace("/n0?", "/m0?"))
        vm.rcmd("block-export-del", {"id": "m0"})
        vm.rcmd("blockdev-del", {"node-name": "n0"})
    finally:
        p.terminate()
        p.wait(10)
    check_server_image(img)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x11 12M 1M", img)
    want = mapped(img)
    expect(got == want, f"block status over the client {got} != qemu-img map of the server's image {want}")


def case_qsd_export(vm, d):
    img = os.path.join(d, "srv.qcow2")
    run("qemu-img", "create", "-f", "qcow2", img, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 12M 1M", img)
    with qsd_monitor(d) as qsd:
        sock = os.path.join(d, "qsd-nbd.sock")
        qsd.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "s0",
                                  "file": {"driver": "file", "filename": img}})
        qsd.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        qsd.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "s0", "writable": True,
                                      "name": "exp"})
        uri = data_round_trip(vm, d, img, {"server": unix(sock), "export": "exp"}, "q0")
        vm.rcmd("block-export-add", {"type": "nbd", "id": "m0", "node-name": "q0", "name": "m0"})
        got = mapped(uri.replace("/q0?", "/m0?"))
        vm.rcmd("block-export-del", {"id": "m0"})
        vm.rcmd("blockdev-del", {"node-name": "q0"})
        want = mapped(f"nbd+unix:///exp?socket={sock}")
        qsd.rcmd("block-export-del", {"id": "e0"})
    check_server_image(img, "qcow2")
    run("qemu-img", "check", img)
    expect(got == want, f"block status over the client {got} != QSD's own map {want}")


def case_own_server(vm, d):
    img = os.path.join(d, "own.raw")
    run("qemu-img", "create", "-f", "raw", img, "16M")
    vm.rcmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img})
    sock = os.path.join(d, "sluice-nbd.sock")
    vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "own", "node-name": "f0", "writable": True})
    data_round_trip(vm, d, img, {"server": unix(sock), "export": "f0"}, "c0")
    vm.rcmd("blockdev-del", {"node-name": "c0"})
    # The SPDK dialect, through SPDK's own client.
    rpc = JSONRPCClient(parse_args().rpc)
    name = rpc.call("bdev_nbd_client_create", {"name": "c1", "socket": sock, "export": "f0"})
    expect(name == "c1", name)
    b = rpc.call("bdev_get_bdevs", {"name": "c1"})[0]
    expect(b["product_name"] == "NBD disk" and b["num_blocks"] * b["block_size"] == 16 * MiB, b)
    expect(b["driver_specific"]["nbd"]["filename"] == f"nbd+unix:///f0?socket={sock}", b)
    try:
        rpc.call("bdev_nbd_client_create", {"name": "c2", "socket": sock, "host": "h"})
        raise Mismatch("socket and host together accepted")
    except Mismatch:
        raise
    except Exception as e:
        expect("either" in str(e), e)
    rpc.call("bdev_nbd_client_delete", {"name": "c1"})
    expect(rpc.call("bdev_get_bdevs", {}) and all(x["name"] != "c1" for x in rpc.call("bdev_get_bdevs", {})),
           "c1 still listed")
    vm.rcmd("block-export-del", {"id": "own"})
    vm.rcmd("blockdev-del", {"node-name": "f0"})
    check_server_image(img)


def answers(vm, d, script):
    out = []
    for cmd, args in script:
        r = vm.raw(cmd, args)
        if "error" in r:
            out.append((cmd, "error", r["error"]["class"], r["error"]["desc"].replace(d, "D")))
        else:
            out.append((cmd, "ok"))
    return out


def case_fio_verify(vm, d):
    """fio with checksums over sluice's export of an nbd node on qemu-nbd
    (which takes one client): two connections to sluice, on two reactors,
    share the client's one connection; every block verified."""
    img = os.path.join(d, "srv.raw")
    run("qemu-img", "create", "-f", "raw", img, "64M")
    sock = os.path.join(d, "qn.sock")
    p = qemu_nbd(sock, img)
    try:
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "f0", "server": unix(sock), "export": "exp"})
        uri = sluice_export(vm, d, "f0", "f0")
        r = run("fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                "--iodepth=16", "--size=32M", "--numjobs=2", "--offset_increment=32M", "--verify=crc32c",
                "--do_verify=1", "--verify_state_save=0", "--group_reporting", ok=False)
        expect(r.returncode == 0 and "err= 0" in r.stdout, f"fio: {r.stdout}{r.stderr}")
        t = run("fio", "--name=s", "--ioengine=nbd", f"--uri={uri}", "--rw=read", "--bs=1M",
                "--iodepth=8", "--size=64M", "--output-format=json", ok=False)
        expect(t.returncode == 0, f"fio: {t.stdout}{t.stderr}")
        bw = json.loads(t.stdout[t.stdout.index("{"):])["jobs"][0]["read"]["bw_bytes"]
        print(f"sequential 1 MiB reads through sluice's NBD client: {bw / MiB:.0f} MiB/s")
        vm.rcmd("block-export-del", {"id": "f0"})
        vm.rcmd("blockdev-del", {"node-name": "f0"})
    finally:
        p.terminate()
        p.wait(10)


def case_errors_match_qsd(vm, d):
    img = os.path.join(d, "srv.raw")
    run("qemu-img", "create", "-f", "raw", img, "1M")
    sock = os.path.join(d, "qn.sock")
    p = qemu_nbd(sock, img)
    try:
        script = [
            ("blockdev-add", {"driver": "nbd", "node-name": "a", "server": unix(sock), "export": "nosuch"}),
            ("blockdev-add", {"driver": "nbd", "node-name": "b", "server": unix(os.path.join(d, "none.sock")),
                              "export": "exp"}),
            ("blockdev-add", {"driver": "nbd", "node-name": "i", "export": "exp",
                              "server": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
            ("blockdev-add", {"driver": "nbd", "node-name": "i", "export": "exp",
                              "server": {"type": "inet", "host": "127.0.0.1", "port": "x"}}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c"}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": {"type": "unix"}}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": {"type": "bogus", "path": "x"}}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": unix(sock), "export": "exp",
                              "bogus": 1}),
            ("blockdev-add", {"driver": "nbd", "node-name": "ok", "server": unix(sock), "export": "exp"}),
            ("blockdev-del", {"node-name": "ok"}),
        ]
        mine = answers(vm, d, script)
        add = {"driver": "nbd", "node-name": "n1", "server": unix(sock), "export": "exp"}

        def node(m):
            m.rcmd("blockdev-add", add)
            n = [x for x in m.rcmd("query-named-block-nodes") if x["node-name"] == "n1"][0]
            m.rcmd("blockdev-del", {"node-name": "n1"})
            # QEMU 10's "active" and sluice's "dirty-flag" belong to every node's rendering.
            n.pop("active", None)
            n["image"].pop("dirty-flag", None)
            return n

        mine_node = node(vm)
        with qsd_monitor(d) as qsd:
            theirs = answers(qsd, d, script)
            theirs_node = node(qsd)
    finally:
        p.terminate()
        p.wait(10)
    for m, t in zip(mine, theirs):
        print("sluice:", m)
        print("qsd:   ", t)
    for m, t in zip(mine, theirs):
        expect(m == t, f"sluice {m} vs QSD {t}")
    expect(mine_node == theirs_node, f"query-named-block-nodes: sluice {mine_node} vs QSD {theirs_node}")


def case_open_timeout(vm, d):
    """open-timeout: the first connection is retried until the server
    appears; without it, one attempt."""
    img = os.path.join(d, "srv.raw")
    run("qemu-img", "create", "-f", "raw", img, "1M")
    sock = os.path.join(d, "late.sock")
    r = vm.raw("blockdev-add", {"driver": "nbd", "node-name": "t0", "server": unix(sock), "export": "exp"})
    expect("error" in r and "Failed to connect" in r["error"]["desc"], r)
    procs = []
    starter = threading.Timer(1.0, lambda: procs.append(qemu_nbd(sock, img)))
    starter.start()
    try:
        t0 = time.time()
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "t0", "server": unix(sock), "export": "exp",
                                 "open-timeout": 10})
        took = time.time() - t0
        expect(0.8 <= took < 8, f"blockdev-add with open-timeout took {took:.2f}s")
        vm.rcmd("blockdev-del", {"node-name": "t0"})
    finally:
        starter.join()
        for p in procs:
            p.terminate()
            p.wait(10)


class Proxy:
    """A Unix socket relay in front of an NBD server that counts the bytes
    the server sends (what a client moves over the network) and the bytes the
    client asks to read (NBD_CMD_READ lengths: a server that answers holes
    with OFFSET_HOLE chunks moves little either way)."""

    def __init__(self, listen, target):
        self.target = target
        self.down = 0
        self.read_asked = 0
        self.lock = threading.Lock()
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(listen)
        self.srv.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.target)
            threading.Thread(target=self._pump, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, True), daemon=True).start()

    def _pump(self, a, b, count):
        buf = b""
        started = False
        skip = 0
        try:
            while True:
                x = a.recv(1 << 20)
                if not x:
                    break
                if count:
                    with self.lock:
                        self.down += len(x)
                else:
                    # The client's requests: 28-byte headers (a write's payload skipped).
                    buf += x
                    if not started:
                        i = buf.find(b"\x25\x60\x95\x13")
                        started = i >= 0
                        buf = buf[i:] if started else buf[-3:]
                    while started:
                        if skip:
                            k = min(skip, len(buf))
                            buf, skip = buf[k:], skip - k
                            if skip:
                                break
                        if len(buf) < 28:
                            break
                        h, buf = buf[:28], buf[28:]
                        if h[:4] != b"\x25\x60\x95\x13":
                            raise Mismatch("the proxy lost the request stream")
                        ty, n = int.from_bytes(h[6:8], "big"), int.from_bytes(h[24:28], "big")
                        if ty == 0:
                            with self.lock:
                                self.read_asked += n
                        elif ty == 1:
                            skip = n
                b.sendall(x)
        except OSError:
            pass
        finally:
            for z in (a, b):
                try:
                    z.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.srv.close()


def case_stream_over_nbd(vm, d):
    """A local overlay on an nbd+unix:// backing served by QSD, streamed until
    it stands alone; the stream skips the source's holes."""
    src = os.path.join(d, "src.raw")
    run("qemu-img", "create", "-f", "raw", src, "1G")
    # 64 MiB of data in 16 pieces of 4 MiB spread over 1 GiB.
    cmds = []
    for i in range(16):
        cmds += ["-c", f"write -P {0x10 + i} {i * 64 + 7}M 4M"]
    run("qemu-io", "-f", "raw", *cmds, src)
    with qsd_monitor(d) as qsd:
        sock = os.path.join(d, "qsd-nbd.sock")
        qsd.rcmd("blockdev-add", {"driver": "file", "node-name": "src", "filename": src, "read-only": True})
        qsd.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        qsd.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": "src"})
        proxy = Proxy(os.path.join(d, "proxy.sock"), sock)
        ov = os.path.join(d, "ov.qcow2")
        backing = f"nbd+unix:///src?socket={os.path.join(d, 'proxy.sock')}"
        run("qemu-img", "create", "-f", "qcow2", "-b", backing, "-F", "raw", ov)
        info = json.loads(run("qemu-img", "info", "--output=json", ov).stdout)
        expect(info["backing-filename"] == backing, info)
        # A write of the overlay's own, kept by the stream.
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0xee 7M 64k", ov)
        before, asked_before = proxy.down, proxy.read_asked
        vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                                 "file": {"driver": "file", "filename": ov}})
        n = {x["node-name"]: x for x in vm.rcmd("query-named-block-nodes")}["ov"]
        expect(n.get("backing_file") == backing, n)
        vm.rcmd("block-stream", {"device": "ov", "job-id": "s0"})
        ev = vm.event_wait("BLOCK_JOB_COMPLETED", 120, {"device": "s0"})
        expect("error" not in ev["data"], ev)
        vm.rcmd("blockdev-del", {"node-name": "ov"})
        moved = proxy.down - before
        asked = proxy.read_asked - asked_before
        proxy.close()
        print(f"stream: {moved} bytes from the NBD server, {asked} bytes of reads asked, "
              "for 64 MiB of data in 1 GiB")
        expect(asked >= 60 * MiB, f"the stream asked to read only {asked} bytes: the proxy missed it")
        expect(asked < 80 * MiB, f"the stream asked to read {asked} bytes over NBD: holes were read")
        expect(moved < 80 * MiB, f"the stream read {moved} bytes over NBD: holes were copied")
        qsd.rcmd("block-export-del", {"id": "e0"})
    info = json.loads(run("qemu-img", "info", "--output=json", ov).stdout)
    expect("backing-filename" not in info, info)
    run("qemu-img", "check", ov)
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0xee 7M 64k", ov)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xee 7M 64k", src)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, src)


def rpc_bdev(vm, name):
    return vm.rcmd("bdev_get_bdevs", {"name": name})[0]


def case_reconnect(vm, d):
    """The server killed and restarted within reconnect-delay: requests in
    flight succeed. Killed for good: requests fail with EIO after the delay."""
    img = os.path.join(d, "srv.raw")
    run("qemu-img", "create", "-f", "raw", img, "64M")
    sock = os.path.join(d, "qn.sock")
    p = qemu_nbd(sock, img)
    vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "r0", "server": unix(sock), "export": "exp",
                             "reconnect-delay": 10})
    uri = sluice_export(vm, d, "r0", "r0")
    cmds = []
    for i in range(48):
        cmds += ["-c", f"write -P {0x40 + i} {i}M 1M", "-c", f"read -P {0x40 + i} {i}M 1M"]
    io = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, uri], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    time.sleep(0.3)
    p.kill()
    p.wait(10)
    time.sleep(1.0)
    p = qemu_nbd(sock, img)
    out, _ = io.communicate(timeout=60)
    expect(io.returncode == 0 and "error" not in out.lower() and "failed" not in out,
           f"I/O across a server restart failed: {out[-2000:]}")
    ds = rpc_bdev(vm, "r0")["driver_specific"]["nbd"]
    expect(ds["reconnects"] >= 1 and ds["connections_dropped"] >= 1, ds)
    vm.rcmd("block-export-del", {"id": "r0"})
    vm.rcmd("blockdev-del", {"node-name": "r0"})
    # Killed for good: EIO once the delay has passed.
    vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "r1", "server": unix(sock), "export": "exp",
                             "reconnect-delay": 2})
    uri = sluice_export(vm, d, "r1", "r1")
    run("qemu-io", "-f", "raw", "-c", "read -P 0x40 0 1M", uri)
    p.kill()
    p.wait(10)
    t0 = time.time()
    r = run("qemu-io", "-f", "raw", "-c", "read 0 64k", uri, ok=False)
    took = time.time() - t0
    expect("Input/output error" in r.stdout + r.stderr, f"read with the server gone: {r.stdout}{r.stderr}")
    expect(took >= 1.5, f"the read failed after {took:.2f}s, before reconnect-delay")
    vm.rcmd("block-export-del", {"id": "r1"})
    vm.rcmd("blockdev-del", {"node-name": "r1"})
    run("qemu-io", "-f", "raw", *[c for i in range(48) for c in ("-c", f"read -P {0x40 + i} {i}M 1M")], img)


def case_stream_server_gone(vm, d):
    """A stream with on-error=report whose NBD backing server is gone fails
    with the error event; the overlay is intact."""
    src = os.path.join(d, "src.raw")
    run("qemu-img", "create", "-f", "raw", src, "64M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64M", src)
    sock = os.path.join(d, "qn.sock")
    p = qemu_nbd(sock, src)
    ov = os.path.join(d, "ov.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", f"nbd+unix:///exp?socket={sock}", "-F", "raw", ov)
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": {"driver": "file", "filename": ov}})
    p.kill()
    p.wait(10)
    vm.rcmd("block-stream", {"device": "ov", "job-id": "s1", "on-error": "report"})
    ev = vm.event_wait("BLOCK_JOB_COMPLETED", 60, {"device": "s1"})
    expect(ev["data"].get("error") == "Input/output error", ev)
    vm.rcmd("blockdev-del", {"node-name": "ov"})
    run("qemu-img", "check", json.dumps({"driver": "qcow2", "backing": None,
                                         "file": {"driver": "file", "filename": ov}}).join(["json:", ""]))


def case_json_backing(vm, d):
    """Backing names as QEMU writes them: a json: name with driver nbd, and
    nbd:// over TCP; the overlay reads the server's data through them."""
    src = os.path.join(d, "src.raw")
    run("qemu-img", "create", "-f", "raw", src, "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 1M", src)
    sock = os.path.join(d, "qn.sock")
    p = qemu_nbd(sock, src, extra=("-e", "4"))
    port = None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = subprocess.Popen(["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "exp", "-t",
                          "-r", src], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise Mismatch("qemu-nbd on TCP did not start")
                time.sleep(0.05)
        names = [
            json.dumps({"driver": "nbd", "server": {"type": "unix", "path": sock}, "export": "exp"})
            .join(["json:", ""]),
            f"nbd://127.0.0.1:{port}/exp",
        ]
        for i, name in enumerate(names):
            ov = os.path.join(d, f"ov{i}.qcow2")
            # The overlay is larger than its backing: past the backing's end reads as zeroes.
            run("qemu-img", "create", "-f", "qcow2", "-u", "-b", name, "-F", "raw", ov, "16M")
            expect(json.loads(run("qemu-img", "info", "--output=json", ov).stdout)["backing-filename"] == name,
                   "qemu-img wrote another name")
            vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": f"ov{i}",
                                     "file": {"driver": "file", "filename": ov}})
            uri = sluice_export(vm, d, f"ov{i}", f"ov{i}")
            run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 1M 1M", "-c", "read -P 0 0 1M",
                "-c", "read -P 0 8M 8M", uri)
            vm.rcmd("block-export-del", {"id": f"ov{i}"})
            vm.rcmd("block-stream", {"device": f"ov{i}", "job-id": f"s{i}"})
            ev = vm.event_wait("BLOCK_JOB_COMPLETED", 60, {"device": f"s{i}"})
            expect("error" not in ev["data"], ev)
            vm.rcmd("blockdev-del", {"node-name": f"ov{i}"})
            run("qemu-img", "check", ov)
            run("qemu-io", "-f", "qcow2", "-c", "read -P 0x77 1M 1M", "-c", "read -P 0 0 1M",
                "-c", "read -P 0 2M 14M", ov)
            expect("backing-filename" not in json.loads(run("qemu-img", "info", "--output=json", ov).stdout),
                   "the stream left a backing file")
    finally:
        for x in (p, t):
            x.terminate()
            x.wait(10)


GARBAGE = b"\xa5" * 64


def fake_server(path, bad):
    """Serves one connection: a correct handshake up to step `bad`, garbage
    there; past the handshake, garbage as the first reply."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve():
        try:
            c, _ = srv.accept()
            c.settimeout(10)
            step = [0]

            def send(b):
                if step[0] == bad:
                    c.sendall(GARBAGE)
                    raise EOFError
                step[0] += 1
                c.sendall(b)

            def recv(n):
                b = b""
                while len(b) < n:
                    x = c.recv(n - len(b))
                    if not x:
                        raise EOFError
                    b += x
                return b

            def rep(opt, ty, data=b""):
                return (0x3e889045565a9).to_bytes(8, "big") + opt.to_bytes(4, "big") + \
                    ty.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data

            send(b"NBDMAGIC" + b"IHAVEOPT" + (3).to_bytes(2, "big"))
            recv(4)
            while True:
                h = recv(16)
                opt = int.from_bytes(h[8:12], "big")
                data = recv(int.from_bytes(h[12:16], "big"))
                if opt == 8:
                    send(rep(8, 1))
                elif opt == 10:
                    send(rep(10, 4, (1).to_bytes(4, "big") + b"base:allocation") + rep(10, 1))
                elif opt == 7:
                    info = (0).to_bytes(2, "big") + (MiB).to_bytes(8, "big") + (1 | 4).to_bytes(2, "big")
                    send(rep(7, 3, info) + rep(7, 1))
                    break
                else:
                    send(rep(opt, 0x80000001))
            recv(28)
            c.sendall(GARBAGE)
            time.sleep(0.5)
        except (EOFError, OSError):
            pass
        finally:
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def case_garbage(vm, d):
    """Garbage at each step of the handshake: blockdev-add fails with a clear
    error. Garbage as a reply: the connection is dropped, the read fails with
    EIO. The daemon never panics (its stderr is checked by the caller)."""
    for bad in range(4):
        sock = os.path.join(d, f"g{bad}.sock")
        t = fake_server(sock, bad)
        r = vm.raw("blockdev-add", {"driver": "nbd", "node-name": f"g{bad}", "server": unix(sock),
                                    "export": "x"})
        expect("error" in r and "NBD protocol error" in r["error"]["desc"], f"step {bad}: {r}")
        t.join(10)
    sock = os.path.join(d, "gr.sock")
    t = fake_server(sock, 99)
    vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "gr", "server": unix(sock), "export": "x"})
    uri = sluice_export(vm, d, "gr", "gr")
    r = run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri, ok=False)
    expect("Input/output error" in r.stdout + r.stderr, f"read of a garbage reply: {r.stdout}{r.stderr}")
    ds = rpc_bdev(vm, "gr")["driver_specific"]["nbd"]
    expect(ds["connections_dropped"] >= 1, ds)
    vm.rcmd("block-export-del", {"id": "gr"})
    vm.rcmd("blockdev-del", {"node-name": "gr"})
    t.join(10)


run_case(globals())

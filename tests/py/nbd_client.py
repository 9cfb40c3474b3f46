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

from stream_common import run_case, qsd_monitor

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
            ("blockdev-add", {"driver": "nbd", "node-name": "c"}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": {"type": "unix"}}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": {"type": "bogus", "path": "x"}}),
            ("blockdev-add", {"driver": "nbd", "node-name": "c", "server": unix(sock), "export": "exp",
                              "bogus": 1}),
            ("blockdev-add", {"driver": "nbd", "node-name": "ok", "server": unix(sock), "export": "exp"}),
            ("blockdev-del", {"node-name": "ok"}),
        ]
        mine = answers(vm, d, script)
        with qsd_monitor(d) as qsd:
            theirs = answers(qsd, d, script)
    finally:
        p.terminate()
        p.wait(10)
    for m, t in zip(mine, theirs):
        print("sluice:", m)
        print("qsd:   ", t)
    for m, t in zip(mine, theirs):
        expect(m == t, f"sluice {m} vs QSD {t}")


run_case(globals())

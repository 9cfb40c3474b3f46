"""TLS for NBD end to end (tests/tests/nbd_tls.rs): sluice's server with QEMU's
clients (qemu-io, qemu-img), sluice's client with qemu-storage-daemon's and
qemu-nbd's servers, sluice with itself; the refusals (plain client to a TLS
server, TLS client to a plain server, wrong CA, wrong host name, tls-authz
denied) with QEMU's words, compared with qemu-storage-daemon where QEMU is the
other side; multi-conn over TLS. Certificates are made here (tls_pki.py)."""

import os
import re
import socket
import subprocess
import time

from spdk.rpc.client import JSONRPCClient
from stream_common import parse_args, run_case, qsd_monitor
from tls_pki import CLIENT_DN, make_pki

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
    if not ok and r.returncode == 0:
        raise Mismatch(f"{' '.join(map(str, cmd))} succeeded: {r.stdout}")
    return r


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc=None):
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise Mismatch(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            if time.time() > deadline:
                raise Mismatch(f"nothing listens on {port}")
            time.sleep(0.05)


def inet(port):
    return {"type": "inet", "host": "127.0.0.1", "port": str(port)}


def qemu_tls(pki, port, export, extra=""):
    """qemu-io / qemu-img arguments opening an NBD export over TLS."""
    return ["--object", f"tls-creds-x509,id=c0,dir={pki},endpoint=client", "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
            f"export={export},tls-creds=c0{extra}"]


def qemu_io(pki, port, export, *cmds, ok=True, extra=""):
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    o = qemu_tls(pki, port, export, extra)
    return run(*args[:1], *o[:3], *args[1:], o[3], ok=ok)


def first_error(r):
    """The first line of a qemu tool's error, without the tool's prefix."""
    line = (r.stderr or r.stdout).strip().splitlines()[0]
    return re.sub(r"^qemu-(io|img): can't open( device \S+)?: ", "", line)


def pkis(d):
    return make_pki(os.path.join(d, "pki")), make_pki(os.path.join(d, "rogue"), "Rogue CA")


WRITES = ("write -P 0x3c 0 1M", "write -P 0x4d 3M 512k", "write -z 5M 1M",
          "aio_write -P 0x21 8M 64k", "aio_write -P 0x22 9M 64k", "aio_flush",
          "write -f -P 0x7e 6M 64k")
READS = ("read -P 0x3c 0 1M", "read -P 0x4d 3M 512k", "read -P 0 5M 1M",
         "read -P 0x21 8M 64k", "read -P 0x22 9M 64k", "read -P 0x7e 6M 64k")


def qsd_tls_server(qsd, pki, port, img, fmt="raw", tls=True):
    qsd.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki,
                            "endpoint": "server"})
    qsd.rcmd("blockdev-add", {"driver": fmt, "node-name": "s0",
                              "file": {"driver": "file", "filename": img}})
    args = {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}}
    if tls:
        args["tls-creds"] = "ts"
    qsd.rcmd("nbd-server-start", args)
    qsd.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "s0", "writable": True,
                                  "name": "exp"})


def case_sluice_server(vm, d):
    """qemu-io and qemu-img over TLS to sluice's server; the refusals, each
    with the words qemu-io prints against qemu-storage-daemon's server."""
    pki, rogue = pkis(d)
    img = os.path.join(d, "srv.raw")
    run("qemu-img", "create", "-f", "raw", img, "16M")
    vm.rcmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img})
    vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki,
                           "endpoint": "server"})
    port = free_port()
    vm.rcmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                   "port": str(port)}},
                                 "tls-creds": "ts"})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0", "writable": True,
                                 "name": "exp"})
    qemu_io(pki, port, "exp", *WRITES)
    qemu_io(pki, port, "exp", *READS)
    # A whole-image copy through TLS, compared with the file.
    out = os.path.join(d, "copy.raw")
    o = qemu_tls(pki, port, "exp")
    run("qemu-img", "convert", *o[:3], "-O", "raw", o[3], out)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", img, out)

    # The refusals, with QEMU's server beside ours.
    qimg = os.path.join(d, "qsd.raw")
    run("qemu-img", "create", "-f", "raw", qimg, "16M")
    qport = free_port()
    with qsd_monitor(d) as qsd:
        qsd_tls_server(qsd, pki, qport, qimg)
        for what, fn in (
            ("plain client", lambda p: run("qemu-io", "-f", "raw", "-c", "read 0 4k",
                                           f"nbd://127.0.0.1:{p}/exp", ok=False)),
            ("wrong CA", lambda p: qemu_io(rogue, p, "exp", "read 0 4k", ok=False)),
            ("wrong host", lambda p: qemu_io(pki, p, "exp", "read 0 4k", ok=False,
                                             extra=",tls-hostname=evil.test")),
        ):
            ours, theirs = first_error(fn(port)), first_error(fn(qport))
            expect(ours == theirs, f"{what}: sluice's server gives {ours!r}, QSD's {theirs!r}")
    # Client certificates: a client without one is refused (verify-peer).
    nocert = os.path.join(d, "nocert")
    os.makedirs(nocert)
    os.symlink(os.path.join(pki, "ca-cert.pem"), os.path.join(nocert, "ca-cert.pem"))
    qemu_io(nocert, port, "exp", "read 0 4k", ok=False)
    # tls-authz: denied, then allowed.
    vm.rcmd("object-add", {"qom-type": "authz-simple", "id": "deny", "identity": "CN=someone.else"})
    vm.rcmd("object-add", {"qom-type": "authz-simple", "id": "allow", "identity": CLIENT_DN})
    for authz, ok in (("deny", False), ("allow", True)):
        vm.rcmd("nbd-server-stop")
        vm.rcmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                       "port": str(port)}},
                                     "tls-creds": "ts", "tls-authz": authz})
        vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0",
                                     "name": "exp", "writable": True})
        qemu_io(pki, port, "exp", "read -P 0x3c 0 1M", ok=ok)
    vm.rcmd("nbd-server-stop")
    vm.rcmd("blockdev-del", {"node-name": "f0"})
    run("qemu-io", "-f", "raw", *[a for c in READS for a in ("-c", c)], img)


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
    """object-add / object-del / nbd-server-start / blockdev-add with TLS:
    the same answers as qemu-storage-daemon's."""
    pki = make_pki(os.path.join(d, "pki"))
    plain = free_port()
    script = [
        ("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki, "endpoint": "server"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki, "endpoint": "server"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "tx", "dir": os.path.join(d, "nope"),
                        "endpoint": "server"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "ty", "dir": pki,
                        "endpoint": "sideways"}),
        ("object-add", {"qom-type": "no-such-type", "id": "tz"}),
        ("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki}),
        ("object-add", {"qom-type": "authz-simple", "id": "a0", "identity": CLIENT_DN}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                "port": str(free_port())}},
                              "tls-creds": "tc"}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                "port": str(free_port())}},
                              "tls-creds": "nope"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "n0", "export": "x",
                          "server": inet(plain), "tls-creds": "ts"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "n1", "export": "x",
                          "server": inet(plain), "tls-creds": "nope"}),
        ("object-del", {"id": "zz"}),
        ("object-del", {"id": "a0"}),
        ("object-del", {"id": "tc"}),
    ]
    ours = answers(vm, d, script)
    with qsd_monitor(d) as qsd:
        theirs = answers(qsd, d, script)
    expect(ours == theirs, "answers differ:\n" + "\n".join(
        f"{a}\n  vs QSD {b}" for a, b in zip(ours, theirs) if a != b))


def sluice_client_round_trip(vm, node, port, pki_id, check=None):
    vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": node, "export": "exp",
                             "server": inet(port), "tls-creds": pki_id})
    sock = os.path.join(parse_args().dir, "own.sock")
    if not os.path.exists(sock):
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    vm.rcmd("block-export-add", {"type": "nbd", "id": node, "node-name": node, "writable": True})
    uri = f"nbd+unix:///{node}?socket={sock}"
    run("qemu-io", "-f", "raw", *[a for c in WRITES for a in ("-c", c)], uri)
    run("qemu-io", "-f", "raw", *[a for c in READS for a in ("-c", c)], uri)
    # A large read: many TLS records per reply.
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 1M", "-c", "read 0 16M", uri)
    vm.rcmd("block-export-del", {"id": node})
    vm.rcmd("blockdev-del", {"node-name": node})


def case_sluice_client_qsd(vm, d):
    """sluice's client over TLS to qemu-storage-daemon's export; TLS client
    to a plain server and wrong CA refused with QEMU's words."""
    pki, rogue = pkis(d)
    vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki})
    vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tr", "dir": rogue})
    img = os.path.join(d, "srv.qcow2")
    run("qemu-img", "create", "-f", "qcow2", img, "16M")
    port, plain = free_port(), free_port()
    with qsd_monitor(d) as qsd:
        qsd_tls_server(qsd, pki, port, img, "qcow2")
        sluice_client_round_trip(vm, "q0", port, "tc")
        r = vm.raw("blockdev-add", {"driver": "nbd", "node-name": "bad", "export": "exp",
                                    "server": inet(port), "tls-creds": "tr"})
        expect("error" in r and "The certificate hasn't got a known issuer" in r["error"]["desc"], r)
        r = vm.raw("blockdev-add", {"driver": "nbd", "node-name": "bad", "export": "exp",
                                    "server": inet(port)})
        expect("error" in r and "TLS negotiation required before option 7 (go)"
               in r["error"]["desc"], r)
        qsd.rcmd("block-export-del", {"id": "e0"})
        qsd.rcmd("nbd-server-stop")
    run("qemu-img", "check", img)
    run("qemu-io", "-f", "qcow2", *[a for c in READS for a in ("-c", c)], img)
    # TLS client, plain QSD server: the words of QEMU's client (qemu-io).
    nimg = os.path.join(d, "plain.raw")
    run("qemu-img", "create", "-f", "raw", nimg, "16M")
    with qsd_monitor(d) as qsd:
        qsd_tls_server(qsd, pki, plain, nimg, tls=False)
        r = vm.raw("blockdev-add", {"driver": "nbd", "node-name": "bad", "export": "exp",
                                    "server": inet(plain), "tls-creds": "tc"})
        q = first_error(qemu_io(pki, plain, "exp", "read 0 4k", ok=False))
        expect("error" in r and r["error"]["desc"] == q,
               f"TLS client to a plain server: sluice {r}, qemu-io {q!r}")


def ss_conns(port):
    """Established TCP socket ends with `port` on either side."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def both_reactors(o, pattern, base=0):
    """Two qemu-io clients at once (sluice's server puts them on its two
    reactors), each writing 4 MiB of its own pattern."""
    ps = [subprocess.Popen(["qemu-io", *o[:3], "-c",
                            f"write -P {pattern + i} {base + i * 4}M 4M", o[3]],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]
    for p in ps:
        out, _ = p.communicate(timeout=60)
        expect(p.returncode == 0, out)


def case_sluice_to_sluice_multiconn(vm, d):
    """sluice's client to sluice's own TLS server (multi-conn: one connection
    per reactor, counted with ss), and to qemu-nbd --tls-creds -e 4; also the
    SPDK dialect's tls_creds."""
    pki, _ = pkis(d)
    vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki,
                           "endpoint": "server"})
    vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki,
                           "endpoint": "client"})
    img = os.path.join(d, "own.raw")
    run("qemu-img", "create", "-f", "raw", img, "16M")
    vm.rcmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img})
    port = free_port()
    vm.rcmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                   "port": str(port)}},
                                 "tls-creds": "ts"})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0", "writable": True,
                                 "name": "exp"})
    vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "c0", "export": "exp",
                             "server": inet(port), "tls-creds": "tc"})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "x0", "node-name": "c0", "writable": True,
                                 "name": "x0"})
    # Clients on both reactors (qemu-io twice at once, on sluice's server
    # which spreads connections round-robin); then the client's connections
    # to the server: one per reactor. (Each of ours shows on both ends, and
    # the two qemu-io are gone: the server's port sees the client's only.)
    before = ss_conns(port)
    both_reactors(qemu_tls(pki, port, "x0"), 0x50)
    conns = ss_conns(port)
    expect(conns == 2 * 2, f"{conns} socket ends on a multi-conn server's port (before the "
           f"clients: {before}); want 2 connections, one per reactor")
    vm.rcmd("block-export-del", {"id": "x0"})
    vm.rcmd("blockdev-del", {"node-name": "c0"})
    vm.rcmd("block-export-del", {"id": "e0"})
    vm.rcmd("blockdev-del", {"node-name": "f0"})
    run("qemu-io", "-f", "raw", "-c", "read -P 0x50 0 4M", "-c", "read -P 0x51 4M 4M", img)
    # qemu-nbd with TLS and multi-conn (-e 4).
    qport = free_port()
    qn = subprocess.Popen(["qemu-nbd", "-f", "raw", "-p", str(qport), "-b", "127.0.0.1", "-x", "exp",
                           "-e", "4", "--object",
                           f"tls-creds-x509,id=ts,dir={pki},endpoint=server", "--tls-creds", "ts",
                           img], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(qport, qn)
        time.sleep(0.2)
        # (wait_port's probe connection is gone by now.)
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "m0", "export": "exp",
                                 "server": inet(qport), "tls-creds": "tc"})
        vm.rcmd("block-export-add", {"type": "nbd", "id": "m0", "node-name": "m0",
                                     "writable": True, "name": "m0"})
        o = qemu_tls(pki, port, "m0")
        run("qemu-io", *o[:3], "-c", "read -P 0x50 0 4M", o[3])
        both_reactors(o, 0x60, base=8)
        conns = ss_conns(qport)
        expect(conns == 2 * 2, f"{conns} socket ends on qemu-nbd -e 4's port; want 2 "
               "connections, one per reactor")
        vm.rcmd("block-export-del", {"id": "m0"})
        vm.rcmd("blockdev-del", {"node-name": "m0"})
    finally:
        qn.terminate()
        qn.wait(10)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x60 8M 4M", "-c", "read -P 0x61 12M 4M", img)
    # The SPDK dialect: bdev_nbd_client_create with tls_creds.
    vm.rcmd("blockdev-add", {"driver": "file", "node-name": "f1", "filename": img})
    vm.rcmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f1", "name": "exp"})
    rpc = JSONRPCClient(parse_args().rpc)
    name = rpc.call("bdev_nbd_client_create", {"name": "s0", "host": "127.0.0.1", "port": port,
                                               "export": "exp", "tls_creds": "tc",
                                               "tls_hostname": "localhost"})
    expect(name == "s0", name)
    rpc.call("bdev_nbd_client_delete", {"name": "s0"})
    vm.rcmd("block-export-del", {"id": "e1"})
    vm.rcmd("blockdev-del", {"node-name": "f1"})
    vm.rcmd("nbd-server-stop")


run_case(globals())

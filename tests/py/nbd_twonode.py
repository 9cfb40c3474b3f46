"""Two nodes, each a `sluice serve` (or qemu-storage-daemon) in its own
network namespace, joined by a veth pair, talking NBD over TCP (and TLS):
the migration scenarios of issue 15 (tests/tests/nbd_twonode.rs).

Every result is judged with qemu-img compare against a reference made
independently (the source chain converted to raw, the client's writes applied
to it with qemu-io) and qemu-img check. Namespaces are made here and always
removed; where they cannot be made the case is skipped with the reason
(and fails under CI=true)."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from stream_common import Vm
from tls_pki import make_pki

MiB = 1 << 20
A_IP, B_IP = "10.199.0.1", "10.199.0.2"
PORT = 10809


class Mismatch(Exception):
    pass


class Skip(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def run(*cmd, ok=True, timeout=120):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout)
    if ok and (r.returncode != 0 or "verification failed" in r.stdout):
        raise Mismatch(f"{' '.join(map(str, cmd))}: {r.stdout}{r.stderr}")
    return r


class Nets:
    """Two namespaces and a veth pair between them (A_IP in a, B_IP in b)."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.a, self.b = f"slA{tag}", f"slB{tag}"
        self.va, self.vb = f"vsA{tag}", f"vsB{tag}"

    def __enter__(self):
        try:
            for cmd in (["ip", "netns", "add", self.a], ["ip", "netns", "add", self.b],
                        ["ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb],
                        ["ip", "link", "set", self.va, "netns", self.a],
                        ["ip", "link", "set", self.vb, "netns", self.b],
                        ["ip", "-n", self.a, "addr", "add", f"{A_IP}/24", "dev", self.va],
                        ["ip", "-n", self.b, "addr", "add", f"{B_IP}/24", "dev", self.vb],
                        ["ip", "-n", self.a, "link", "set", self.va, "up"],
                        ["ip", "-n", self.b, "link", "set", self.vb, "up"],
                        ["ip", "-n", self.a, "link", "set", "lo", "up"],
                        ["ip", "-n", self.b, "link", "set", "lo", "up"]):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                if r.returncode != 0:
                    raise Skip(f"cannot make network namespaces ({' '.join(cmd)}: {r.stderr.strip()})")
        except (Skip, FileNotFoundError) as e:
            self.__exit__()
            raise Skip(str(e))
        # The link is up once a ping goes through (bounded).
        for _ in range(50):
            if subprocess.run(["ip", "netns", "exec", self.b, "ping", "-c1", "-W1", A_IP],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        return self

    def link(self, up):
        run("ip", "-n", self.a, "link", "set", self.va, "up" if up else "down")

    def __exit__(self, *exc):
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


class Node:
    """`sluice serve` in namespace `ns`, with a QMP session; its stderr is
    checked for panics when it stops."""

    def __init__(self, binary, ns, d, name):
        self.dir = os.path.join(d, name)
        os.makedirs(self.dir, exist_ok=True)
        self.errpath = os.path.join(self.dir, "stderr")
        self.err = open(self.errpath, "w")
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, binary, "serve", "--runtime-dir",
                                   self.dir, "--no-pin", "-m", "0x3", "--nbd-allow-remote"],
                                  stdout=subprocess.DEVNULL, stderr=self.err,
                                  env={**os.environ, "RUST_LOG": "warn"})
        qmp = os.path.join(self.dir, "sluice-qmp.sock")
        deadline = time.time() + 20
        while True:
            if self.p.poll() is not None:
                raise Mismatch(f"{name} exited: {open(self.errpath).read()}")
            if os.path.exists(qmp):
                try:
                    self.vm = Vm(qmp)
                    break
                except Exception:
                    pass
            if time.time() > deadline:
                raise Mismatch(f"{name} never answered on {qmp}")
            time.sleep(0.05)

    def stop(self):
        if self.p.poll() is None:
            self.vm.q.close()
            self.p.send_signal(signal.SIGTERM)
            rc = self.p.wait(30)
            expect(rc == 0, f"node exit status {rc}: {open(self.errpath).read()}")
        self.check()

    def kill(self):
        try:
            self.vm.q.close()
        except Exception:
            pass  # (the session of a node being killed; nothing to report)
        self.p.kill()
        self.p.wait(10)
        self.check()

    def check(self):
        self.err.close()
        log = open(self.errpath).read()
        expect("panicked" not in log, f"node panicked: {log}")


def qsd_server(ns, pki, img, fmt="qcow2", ip=A_IP, writable=False):
    """qemu-storage-daemon in `ns` exporting `img` as "top" over TLS on `ip`
    (read-only unless `writable`)."""
    ro = "off" if writable else "on"
    p = subprocess.Popen(["ip", "netns", "exec", ns, "qemu-storage-daemon", "--object",
                          f"tls-creds-x509,id=ts,dir={pki},endpoint=server",
                          "--blockdev", f"driver=file,node-name=f0,filename={img},read-only={ro}",
                          "--blockdev", f"driver={fmt},node-name=top,file=f0,read-only={ro}",
                          "--nbd-server", f"addr.type=inet,addr.host={ip},addr.port={PORT},tls-creds=ts",
                          "--export", f"type=nbd,id=e0,node-name=top,name=top,writable={'on' if writable else 'off'}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htln", f"( sport = :{PORT} )"],
                         capture_output=True, text=True).stdout.strip() == "":
        if p.poll() is not None or time.time() > deadline:
            raise Mismatch(f"QSD server did not start: {p.stderr.read() if p.poll() is not None else ''}")
        time.sleep(0.05)
    return p


def make_chain(d):
    """base <- top (qcow2), 16 MiB, data in both layers and holes."""
    base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
    run("qemu-img", "create", "-f", "qcow2", base, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", base)
    run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 4M 4M", "-c", "write -P 0x33 12M 2M", top)
    return top


CLIENT_WRITES = ["write -P 0x77 1M 256k", "write -P 0x78 6M 512k", "write -P 0x79 13M 64k",
                 "write -z 15M 64k"]
CLIENT_READS = ["read -P 0x11 0 1M", "read -P 0x77 1M 256k", "read -P 0x22 4M 2M",
                "read -P 0x78 6M 512k", "read -P 0x33 12M 1M", "read -P 0x79 13M 64k",
                "read -P 0 15M 64k"]


def qemu_io(uri, cmds, fmt="raw"):
    return run("qemu-io", "-f", fmt, *[a for c in cmds for a in ("-c", c)], uri)


def reference(d, top, name="ref.raw"):
    ref = os.path.join(d, name)
    run("qemu-img", "convert", "-O", "raw", top, ref)
    qemu_io(ref, CLIENT_WRITES)
    return ref


def postcopy(binary, d, pki, nets, server):
    """Node B: an overlay on A's export over TLS, served to a client that
    writes and verifies at once, streamed with a speed limit; A goes away."""
    top = make_chain(d)
    a = None
    if server == "sluice":
        a = Node(binary, nets.a, d, "A")
        a.vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki,
                                 "endpoint": "server"})
        a.vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "top", "read-only": True,
                                   "file": {"driver": "file", "filename": top, "read-only": True}})
        a.vm.rcmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": A_IP,
                                                                         "port": str(PORT)}},
                                       "tls-creds": "ts"})
        a.vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top",
                                       "name": "top"})
    else:
        a = qsd_server(nets.a, pki, top)
    b = Node(binary, nets.b, d, "B")
    try:
        vm = b.vm
        vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki})
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "remote", "read-only": True,
                                 "export": "top", "tls-creds": "tc", "reconnect-delay": 5,
                                 "server": {"type": "inet", "host": A_IP, "port": str(PORT)}})
        ov = os.path.join(d, "ov.qcow2")
        run("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"nbd://{A_IP}:{PORT}/top",
            "-F", "raw", ov, "16M")
        vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "remote",
                                 "file": {"driver": "file", "filename": ov}})
        sock = os.path.join(b.dir, "nbd.sock")
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        vm.rcmd("block-export-add", {"type": "nbd", "id": "ov", "node-name": "ov",
                                     "writable": True, "name": "ov"})
        uri = f"nbd+unix:///ov?socket={sock}"
        # The client starts at once (before the stream), then the stream at
        # 2 MiB/s, with the client writing and verifying while it runs.
        qemu_io(uri, ["read -P 0x11 0 1M", "read -P 0x33 12M 2M"])
        vm.rcmd("block-stream", {"device": "ov", "job-id": "s0", "speed": 2 * MiB})
        qemu_io(uri, CLIENT_WRITES)
        qemu_io(uri, CLIENT_READS)
        running = [j for j in vm.rcmd("query-block-jobs") if j["device"] == "s0"]
        expect(running, "the stream ended before the client was done: raise the data or lower the speed")
        ev = vm.event_wait("BLOCK_JOB_COMPLETED", 120, {"device": "s0"})
        expect("error" not in ev["data"], ev)
        # A goes away; B's image stands alone.
        if server == "sluice":
            a.stop()
        else:
            a.terminate()
            a.wait(10)
        a = None
        qemu_io(uri, CLIENT_READS)
        vm.rcmd("block-export-del", {"id": "ov"})
        vm.rcmd("blockdev-del", {"node-name": "ov"})
        vm.rcmd("blockdev-del", {"node-name": "remote"})
    finally:
        b.stop()
        if a is not None:
            if server == "sluice":
                a.kill()
            else:
                a.kill()
    info = json.loads(run("qemu-img", "info", "--output=json", ov).stdout)
    expect("backing-filename" not in info, f"the overlay still has a backing file: {info}")
    run("qemu-img", "check", ov)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, reference(d, top))


def case_postcopy_tls_sluice(binary, d, pki, nets):
    postcopy(binary, d, pki, nets, "sluice")


def case_postcopy_tls_qsd_source(binary, d, pki, nets):
    postcopy(binary, d, pki, nets, "qsd")


def sluice_server(binary, ns, d, name, pki, img, fmt, ip, writable):
    """A sluice node in `ns` exporting `img` as "top" over TLS on `ip`."""
    n = Node(binary, ns, d, name)
    n.vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "ts", "dir": pki,
                             "endpoint": "server"})
    n.vm.rcmd("blockdev-add", {"driver": fmt, "node-name": "top", "read-only": not writable,
                               "file": {"driver": "file", "filename": img,
                                        "read-only": not writable}})
    n.vm.rcmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": ip, "port": str(PORT)}},
                                   "tls-creds": "ts"})
    n.vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "top",
                                   "writable": writable})
    return n


def slow_writer(uri, n, base):
    """A client writing n 8 KiB blocks 20 ms apart, then reading them back."""
    cmds = []
    for i in range(n):
        cmds += ["-c", f"write -P 0x55 {base + i * 8192} 8k", "-c", "sleep 20"]
    cmds += ["-c", f"read -P 0x55 {base} {n * 8}k"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, uri], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def precopy(binary, d, pki, nets, dest):
    """libvirt's non-shared-storage migration: B serves an empty image over
    NBD (TLS); A mirrors its device into it in write-blocking mode while a
    client writes through A's export, pivots; the images compare equal."""
    src, dst = os.path.join(d, "src.qcow2"), os.path.join(d, "dst.raw")
    run("qemu-img", "create", "-f", "qcow2", src, "16M")
    qemu_io(src, ["write -P 0x5a 0 6M", "write -P 0x5b 10M 3M"], "qcow2")
    run("qemu-img", "create", "-f", "raw", dst, "16M")
    ref = os.path.join(d, "ref.raw")
    run("qemu-img", "convert", "-O", "raw", src, ref)
    if dest == "sluice":
        b = sluice_server(binary, nets.b, d, "B", pki, dst, "raw", B_IP, True)
    else:
        b = qsd_server(nets.b, pki, dst, "raw", B_IP, True)
    a = Node(binary, nets.a, d, "A")
    try:
        vm = a.vm
        vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki})
        vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                 "file": {"driver": "file", "filename": src}})
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "tgt", "export": "top",
                                 "tls-creds": "tc",
                                 "server": {"type": "inet", "host": B_IP, "port": str(PORT)}})
        sock = os.path.join(a.dir, "nbd.sock")
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        vm.rcmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src",
                                     "writable": True, "name": "vda"})
        n = 150
        p = slow_writer(f"nbd+unix:///vda?socket={sock}", n, 5 * MiB)
        vm.rcmd("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt",
                                    "sync": "full", "copy-mode": "write-blocking"})
        vm.event_wait("BLOCK_JOB_READY", 60, {"device": "m0"})
        expect(p.poll() is None, "the client finished before the mirror was ready: nothing overlapped")
        out, _ = p.communicate(timeout=120)
        expect(p.returncode == 0 and out.count("wrote 8192/8192") == n and "fail" not in out, out)
        vm.rcmd("block-job-complete", {"device": "m0"})
        vm.event_wait("JOB_STATUS_CHANGE", 60, {"id": "m0", "status": "null"})
        done = [e for e in vm.pending if e["event"] == "BLOCK_JOB_COMPLETED"]
        expect(len(done) == 1 and "error" not in done[0]["data"], f"m0: {done}")
        vm.rcmd("block-export-del", {"id": "e0"})
        vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
        vm.rcmd("blockdev-del", {"node-name": "src"})
        vm.rcmd("blockdev-del", {"node-name": "tgt"})
    finally:
        a.stop()
        if dest == "sluice":
            b.stop()
        else:
            b.terminate()
            b.wait(10)
    qemu_io(ref, [f"write -P 0x55 {5 * MiB} {n * 8}k"])
    run("qemu-img", "check", src)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", dst, ref)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, dst)


def case_precopy_sluice(binary, d, pki, nets):
    precopy(binary, d, pki, nets, "sluice")


def case_precopy_qsd_dest(binary, d, pki, nets):
    precopy(binary, d, pki, nets, "qsd")


def case_rapid_deployment(binary, d, pki, nets):
    """A golden image on A (exported over TLS); B starts ten overlays on it at
    once (each on its own nbd node: a stream holds the nodes it removes, in
    sluice as in QEMU, so two streams cannot share one), serves a client on each (each writes and
    verifies its own pattern), and streams all ten under one shared speed
    limit: a `throttle-group` object the ten jobs draw on (`x-throttle-group`,
    docs/io-limits.md). The ten streams copy 8 MiB each (golden's data; its
    holes are skipped by block status), so they cannot all be done before
    80 MiB at the shared rate. Each overlay ends equal to golden plus its
    client's writes, without a backing file."""
    golden = os.path.join(d, "golden.qcow2")
    run("qemu-img", "create", "-f", "qcow2", golden, "16M")
    qemu_io(golden, ["write -P 0x11 0 4M", "write -P 0x12 8M 4M"], "qcow2")
    ref = os.path.join(d, "golden.raw")
    run("qemu-img", "convert", "-O", "raw", golden, ref)
    a = sluice_server(binary, nets.a, d, "A", pki, golden, "qcow2", A_IP, False)
    b = Node(binary, nets.b, d, "B")
    n, shared = 10, 20 * MiB
    ovs = [os.path.join(d, f"ov{i}.qcow2") for i in range(n)]
    try:
        vm = b.vm
        vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki})
        sock = os.path.join(b.dir, "nbd.sock")
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        for i, ov in enumerate(ovs):
            run("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"nbd://{A_IP}:{PORT}/top",
                "-F", "raw", ov, "16M")
            vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": f"golden{i}", "read-only": True,
                                     "export": "top", "tls-creds": "tc",
                                     "server": {"type": "inet", "host": A_IP, "port": str(PORT)}})
            vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": f"ov{i}",
                                     "backing": f"golden{i}",
                                     "file": {"driver": "file", "filename": ov}})
            vm.rcmd("block-export-add", {"type": "nbd", "id": f"ov{i}", "node-name": f"ov{i}",
                                         "writable": True, "name": f"ov{i}"})
        clients = []
        for i in range(n):
            cmds = ["read -P 0x11 0 1M", f"write -P {0x40 + i} {13 * 1024 + i * 256}k 256k",
                    f"read -P {0x40 + i} {13 * 1024 + i * 256}k 256k", "read -P 0x12 8M 1M"]
            clients.append(subprocess.Popen(
                ["qemu-io", "-f", "raw", *[x for c in cmds for x in ("-c", c)],
                 f"nbd+unix:///ov{i}?socket={sock}"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        vm.rcmd("object-add", {"qom-type": "throttle-group", "id": "streams",
                               "limits": {"bps-total": shared}})
        t0 = time.monotonic()
        for i in range(n):
            vm.rcmd("block-stream", {"device": f"ov{i}", "job-id": f"s{i}",
                                     "x-throttle-group": "streams"})
        for p in clients:
            out, _ = p.communicate(timeout=120)
            expect(p.returncode == 0 and "fail" not in out and "error" not in out.lower(), out)
        left = set(range(n))
        deadline = time.time() + 120
        while left:
            ev = vm.event_wait("BLOCK_JOB_COMPLETED", max(1, deadline - time.time()))
            i = int(ev["data"]["device"][1:])
            expect("error" not in ev["data"], ev)
            left.discard(i)
        took = time.monotonic() - t0
        floor = n * 8 * MiB / shared
        expect(took >= 0.8 * floor,
               f"ten streams sharing {shared // MiB} MiB/s took {took:.2f} s, "
               f"less than 0.8 x {floor:.1f} s: the shared limit did not hold")
        print(f"rapid deployment: ten streams sharing {shared // MiB} MiB/s took {took:.2f} s "
              f"(80 MiB at the shared rate: {floor:.1f} s)", file=sys.stderr)
        for i in range(n):
            vm.rcmd("block-export-del", {"id": f"ov{i}"})
            vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": f"ov{i}"})
            vm.rcmd("blockdev-del", {"node-name": f"ov{i}"})
            vm.rcmd("blockdev-del", {"node-name": f"golden{i}"})
    finally:
        b.stop()
        a.stop()
    for i, ov in enumerate(ovs):
        info = json.loads(run("qemu-img", "info", "--output=json", ov).stdout)
        expect("backing-filename" not in info, f"ov{i} still has a backing file: {info}")
        run("qemu-img", "check", ov)
        want = os.path.join(d, f"want{i}.raw")
        run("cp", ref, want)
        qemu_io(want, [f"write -P {0x40 + i} {13 * 1024 + i * 256}k 256k"])
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, want)
        os.unlink(want)


def start_a(binary, nets, d, pki, top, k):
    return sluice_server(binary, nets.a, d, f"A{k}", pki, top, "qcow2", A_IP, False)


def case_faults(binary, d, pki, nets):
    """Post-copy streams over TLS with faults: the link goes down mid-stream
    (shorter and longer than reconnect-delay), node A is killed mid-stream
    and restarted at once, and killed for longer than reconnect-delay (the
    stream fails, a new one completes once A is back). Every overlay ends
    equal to the chain plus its client's writes, clean, standalone."""
    top = make_chain(d)
    ref = reference(d, top)
    a = start_a(binary, nets, d, pki, top, 0)
    b = Node(binary, nets.b, d, "B")
    restarts = [0]
    log = []
    try:
        vm = b.vm
        vm.rcmd("object-add", {"qom-type": "tls-creds-x509", "id": "tc", "dir": pki})
        vm.rcmd("blockdev-add", {"driver": "nbd", "node-name": "remote", "read-only": True,
                                 "export": "top", "tls-creds": "tc", "reconnect-delay": 3,
                                 "server": {"type": "inet", "host": A_IP, "port": str(PORT)}})
        sock = os.path.join(b.dir, "nbd.sock")
        vm.rcmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})

        def phase(k, fault):
            nonlocal a
            ov = os.path.join(d, f"f{k}.qcow2")
            run("qemu-img", "create", "-f", "qcow2", "-u", "-b", f"nbd://{A_IP}:{PORT}/top",
                "-F", "raw", ov, "16M")
            vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": f"f{k}", "backing": "remote",
                                     "file": {"driver": "file", "filename": ov}})
            vm.rcmd("block-export-add", {"type": "nbd", "id": f"f{k}", "node-name": f"f{k}",
                                         "writable": True, "name": f"f{k}"})
            uri = f"nbd+unix:///f{k}?socket={sock}"
            qemu_io(uri, CLIENT_WRITES)
            vm.rcmd("block-stream", {"device": f"f{k}", "job-id": f"s{k}", "speed": 2 * MiB,
                                     "on-error": "report"})
            time.sleep(1)
            t0 = time.time()
            fault()
            ev = vm.event_wait("BLOCK_JOB_COMPLETED", 120, {"device": f"s{k}"})
            err = ev["data"].get("error")
            log.append(f"phase {k}: stream {'failed: ' + err if err else 'completed'} "
                       f"{time.time() - t0:.1f}s after the fault began")
            if err:
                # After the fault, once the client is connected again (every
                # dropped connection re-established), a new stream completes.
                deadline = time.time() + 20
                while True:
                    c = vm.rcmd("bdev_get_bdevs", {"name": "remote"})[0]["driver_specific"]["nbd"]
                    if c["reconnects"] >= c["connections_dropped"]:
                        break
                    expect(time.time() < deadline, f"phase {k}: never reconnected: {c}")
                    time.sleep(0.1)
                vm.rcmd("block-stream", {"device": f"f{k}", "job-id": f"r{k}"})
                ev = vm.event_wait("BLOCK_JOB_COMPLETED", 120, {"device": f"r{k}"})
                expect("error" not in ev["data"], f"phase {k}: the new stream failed: {ev}")
            qemu_io(uri, CLIENT_READS)
            vm.rcmd("block-export-del", {"id": f"f{k}"})
            vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": f"f{k}"})
            vm.rcmd("blockdev-del", {"node-name": f"f{k}"})
            return ov, err

        def link_down(secs):
            def f():
                nets.link(False)
                try:
                    time.sleep(secs)
                finally:
                    nets.link(True)
            return f

        def kill_a(secs):
            def f():
                nonlocal a
                a.kill()
                time.sleep(secs)
                restarts[0] += 1
                a = start_a(binary, nets, d, pki, top, restarts[0])
            return f

        results = [phase(1, link_down(1.5)), phase(2, link_down(5)), phase(3, kill_a(0)),
                   phase(4, kill_a(5))]
        expect(results[0][1] is None, f"a 1.5 s link loss within reconnect-delay failed the stream: {log}")
        expect(results[2][1] is None, f"a restart within reconnect-delay failed the stream: {log}")
        expect(results[3][1] is not None, f"5 s without a server (reconnect-delay 3) did not fail the stream: {log}")
        vm.rcmd("blockdev-del", {"node-name": "remote"})
    finally:
        b.stop()
        a.stop()
    for ov, _ in results:
        info = json.loads(run("qemu-img", "info", "--output=json", ov).stdout)
        expect("backing-filename" not in info, f"{ov} still has a backing file: {info}")
        run("qemu-img", "check", ov)
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, ref)
    print("\n".join(log))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--case", required=True)
    a = ap.parse_args()
    pki = make_pki(os.path.join(a.dir, "pki"))
    try:
        with Nets() as nets:
            globals()["case_" + a.case](a.bin, a.dir, pki, nets)
    except Skip as e:
        if os.environ.get("CI") == "true":
            raise
        print(f"skipped: {e}")
    print("ok")


main()

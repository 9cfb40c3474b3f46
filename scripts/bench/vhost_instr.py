"""The front end of scripts/bench/vhost_instr.sh: starts one `sluice serve`
(under valgrind callgrind, as the shell half asks), exports a raw file over
vhost-user-blk through QMP, and keeps QD 4 KiB random reads in flight with
tests/py/vhost_client.py's rings until N reads have completed, one kick per
batch, EVENT_IDX on; in lockstep batches of QD unless LOCKSTEP=0, the
reactor parking as soon as it idles unless PARK_US says otherwise. Every read is checked: status OK and the block holds its
own number in its first 8 bytes and zeros after (the shell half writes the
file so). Then it stops the server with SIGTERM and waits for it, so that
callgrind writes its totals.

  vhost_instr.py BIN DATA_FILE RUN_DIR N [QD]

Prints "reads=N". Errors raise (a SystemExit with the reason)."""

import os
import random
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/py"))
import vhost_client as vc  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

BS = 4096


def qmp(path, proc):
    deadline = time.time() + 120  # valgrind starts slowly
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before QMP came up")
        if os.path.exists(path):
            try:
                q = QEMUMonitorProtocol(path)
                q.connect(negotiate=True)
                return q
            except OSError:
                pass
        time.sleep(0.1)
    raise SystemExit(f"no QMP at {path}")


def cmd(q, name, args):
    r = q.cmd_raw(name, args)
    if "return" not in r:
        raise SystemExit(f"{name} {args}: {r}")
    return r["return"]


def drive(sock, blocks, n, qd, lockstep):
    """n verified random reads at queue depth qd (in batches of qd when
    lockstep); returns how many completed."""
    c = vc.Client(sock, mem_size=4 << 20)
    try:
        (ring,) = c.start(queues=1, size=128)
        if not c.features & (1 << vc.F_EVENT_IDX):
            raise SystemExit("EVENT_IDX was not negotiated")
        m = c.mem
        rng = random.Random(1)
        # Slot i: descriptors 3i (header), 3i+1 (data in), 3i+2 (status).
        hdr = [m.alloc(16, 16) for _ in range(qd)]
        din = [m.alloc(BS) for _ in range(qd)]
        st = [m.alloc(1, 1) for _ in range(qd)]
        want = [0] * qd
        for i in range(qd):
            ring.put_desc(3 * i, hdr[i], 16, vc.D_NEXT, 3 * i + 1)
            ring.put_desc(3 * i + 1, din[i], BS, vc.D_WRITE | vc.D_NEXT, 3 * i + 2)
            ring.put_desc(3 * i + 2, st[i], 1, vc.D_WRITE)
        zeros = bytes(BS - 8)
        mv = m.map
        avail, size = ring.avail, ring.size

        def queue(slots):
            nonlocal issued
            issued += len(slots)
            for i in slots:
                b = rng.randrange(blocks)
                want[i] = b
                mv[hdr[i]:hdr[i] + 16] = struct.pack("<IIQ", vc.T_IN, 0, b * (BS // 512))
                mv[st[i]] = 0xFF
                mv[din[i]:din[i] + 8] = b"\xa5" * 8
                e = avail + 4 + 2 * (ring.avail_idx % size)
                mv[e:e + 2] = struct.pack("<H", 3 * i)
                ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
            mv[avail + 2:avail + 4] = struct.pack("<H", ring.avail_idx)
            os.eventfd_write(ring.kick, 1)

        issued, done, again = 0, 0, []
        queue(range(min(qd, n)))
        while done < n:
            got = ring.reap()
            if not got:
                # Ask for a call at the next used entry and look again before
                # sleeping (with the barrier between: vhost_client's module doc).
                if ring.arm_call() and not ring.sleep_on_call(60):
                    raise SystemExit(f"no completion within 60 s after {done} reads")
                continue
            for head, ln in got:
                if head % 3 or head // 3 >= qd:
                    raise SystemExit(f"used id {head} is no chain head of ours")
                i = head // 3
                if mv[st[i]] != vc.S_OK:
                    raise SystemExit(f"read of block {want[i]}: status {mv[st[i]]}")
                if ln != BS + 1:
                    raise SystemExit(f"read of block {want[i]}: used length {ln}, not {BS + 1}")
                (num,) = struct.unpack_from("<Q", mv, din[i])
                if num != want[i] or mv[din[i] + 8:din[i] + BS] != zeros:
                    raise SystemExit(f"read of block {want[i]} returned block {num}'s data or garbage")
                done += 1
                if issued + len(again) < n:
                    again.append(i)
            # Lockstep: the next batch goes once the whole last one is back, so
            # that every busy poll of the server pops a full batch.
            if again and (not lockstep or done == issued):
                queue(again)
                again = []
        return done
    finally:
        c.close()


def main():
    binary, data, d, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    qd = int(sys.argv[5]) if len(sys.argv) > 5 else 32
    if not 1 <= qd <= 42:  # three descriptors each in a 128-entry ring
        raise SystemExit(f"QD {qd} out of 1..42")
    prefix = os.environ.get("VG", "").split()
    os.makedirs(d, exist_ok=True)
    log = open(os.path.join(d, "log"), "w")
    park = os.environ.get("PARK_US", "0")
    p = subprocess.Popen(prefix + [binary, "serve", "--runtime-dir", d, "--no-pin", "-m", "0x1",
                                   "--park-after-us", park],
                         stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, RUST_LOG="error"))
    try:
        q = qmp(os.path.join(d, "sluice-qmp.sock"), p)
        sock = os.path.join(d, "vhost.sock")
        cmd(q, "blockdev-add", {"driver": "file", "filename": data, "node-name": "f", "read-only": True})
        cmd(q, "block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "f",
                                    "addr": {"type": "unix", "path": sock}})
        q.close()
        lockstep = os.environ.get("LOCKSTEP", "1") == "1"
        done = drive(sock, os.path.getsize(data) // BS, n, qd, lockstep)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise SystemExit("the server did not stop within 120 s of SIGTERM")
    if rc not in (0, -signal.SIGTERM):
        raise SystemExit(f"the server exited with {rc}")
    print(f"reads={done}")


if __name__ == "__main__":
    main()

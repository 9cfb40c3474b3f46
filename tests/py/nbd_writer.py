"""A minimal NBD client that writes until its server goes away, logging each
write before it is sent ("S off value fua") and once it is acknowledged
("A off value fua"), and each flush ("FS" sent, "FA" acknowledged), flushed to
the log at once: after the server is killed, the log says which writes were
made durable (acknowledged with FUA, or acknowledged before a flush that was
acknowledged), which were only acknowledged, and which may have been in flight.

    nbd_writer.py SOCKET EXPORT LOG REGION_BYTES SEED [PAUSE_MS]

Each write is one 4 KiB block of one byte value (1..255) at a random 4 KiB
offset below REGION_BYTES, one at a time (queue depth 1); half carry FUA, and
every 16th request is a flush. Exits 0 when the
server hangs up or dies; any protocol surprise raises."""

import os
import random
import socket
import struct
import sys
import time

BS = 4096
REQ_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_WRITE = 1
CMD_FLUSH = 3
CMD_FLAG_FUA = 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server hung up")
        buf += chunk
    return buf


def handshake(s, export):
    head = recv_exact(s, 18)
    if head[:16] != b"NBDMAGICIHAVEOPT":
        raise RuntimeError(f"not a newstyle NBD server: {head!r}")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)  # NBD_OPT_EXPORT_NAME
    size, flags = struct.unpack(">QH", recv_exact(s, 10))
    if flags & (FLAG_SEND_FLUSH | FLAG_SEND_FUA) != FLAG_SEND_FLUSH | FLAG_SEND_FUA:
        raise RuntimeError(f"the export offers no flush or FUA: flags {flags:#x}")
    return size


def main():
    sock, export, log, region, seed = sys.argv[1:6]
    pause = float(sys.argv[6]) / 1000 if len(sys.argv) > 6 else 0.0
    rng = random.Random(int(seed))
    with open(log, "a") as out:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            size = handshake(s, export)
            blocks = min(int(region), size) // BS
            handle = 0
            def reply(what):
                magic, err, h = struct.unpack(">IIQ", recv_exact(s, 16))
                if magic != REPLY_MAGIC or h != handle:
                    raise RuntimeError(f"bad reply {magic:#x} {h} (sent {handle})")
                if err:
                    raise RuntimeError(f"{what} failed: error {err}")

            while True:
                handle += 1
                if handle % 16 == 0:
                    out.write("FS\n")
                    out.flush()
                    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_FLUSH, handle, 0, 0))
                    reply("flush")
                    out.write("FA\n")
                    out.flush()
                    continue
                off = rng.randrange(blocks) * BS
                val = rng.randrange(1, 256)
                fua = rng.randrange(2)
                out.write(f"S {off} {val} {fua}\n")
                out.flush()
                flags = CMD_FLAG_FUA if fua else 0
                s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, CMD_WRITE, handle, off, BS) + bytes([val]) * BS)
                reply(f"write at {off}")
                out.write(f"A {off} {val} {fua}\n")
                out.flush()
                if pause:
                    time.sleep(pause)
        except (EOFError, ConnectionError, BrokenPipeError, FileNotFoundError):
            return 0


if __name__ == "__main__":
    sys.exit(main())

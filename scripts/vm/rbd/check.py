#!/usr/bin/env python3
"""The host's oracle for an overlay the RBD guest scenario left on a namespace:
its guest-visible contents must be the golden image, except in the range the
guest's `sluice perf -w verify` rounds wrote, where every 512-byte sector is
either the golden image's or a verify pattern sector of sluice perf for that
very offset (perf/src/pattern.rs: the sector's byte offset, the write's
generation and the job's seed, then splitmix64-derived words) -- the golden
image plus its writes, nothing stale, misplaced or torn.

Usage: check.py GOLDEN.raw OVERLAY.qcow2 OFFSET LENGTH
Prints one summary line; raises AssertionError on any difference."""

import os
import subprocess
import sys
import tempfile

SECTOR = 512
M64 = (1 << 64) - 1


def mix(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def pattern(off, gen, seed):
    """The sector perf writes at byte `off` for generation `gen`, job `seed`."""
    state = mix(off ^ mix(gen ^ mix(seed)))
    words = [off, gen, seed]
    for _ in range(3, SECTOR // 8):
        state = mix((state + 0x9E3779B97F4A7C15) & M64)
        words.append(state)
    return b"".join(w.to_bytes(8, "little") for w in words)


def check(golden, raw, offset, length):
    if len(raw) != len(golden):
        raise AssertionError(f"virtual size {len(raw)} != the golden image's {len(golden)}")
    end = offset + length
    for lo, hi in ((0, offset), (end, len(golden))):
        if raw[lo:hi] != golden[lo:hi]:
            bad = next(i for i in range(lo, hi) if raw[i] != golden[i])
            raise AssertionError(f"outside the written range, byte {bad} differs from the golden image")
    written = 0
    for off in range(offset, end, SECTOR):
        s = raw[off:off + SECTOR]
        if s == golden[off:off + SECTOR]:
            continue
        gen = int.from_bytes(s[8:16], "little")
        seed = int.from_bytes(s[16:24], "little")
        if s != pattern(off, gen, seed):
            raise AssertionError(
                f"sector at {off} is neither the golden image's nor perf's pattern for that offset "
                f"(first words {s[:24].hex()})")
        written += 1
    if written == 0:
        raise AssertionError(f"no sector written by perf in [{offset}, {end})")
    return written


def main():
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    golden_path, image, offset, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with tempfile.TemporaryDirectory() as d:
        raw_path = os.path.join(d, "image.raw")
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw_path],
                       check=True, timeout=120)
        with open(raw_path, "rb") as f:
            raw = f.read()
    with open(golden_path, "rb") as f:
        golden = f.read()
    written = check(golden, raw, offset, length)
    print(f"{os.path.basename(image)}: golden outside [{offset}, {offset + length}), "
          f"{written} sectors of perf's pattern inside, the rest golden")


if __name__ == "__main__":
    main()

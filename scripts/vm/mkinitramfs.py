#!/usr/bin/env python3
"""Packs a folder into a gzip-compressed newc cpio archive (an initramfs).

Usage: mkinitramfs.py ROOT OUT.gz
Files keep their mode; symlinks are stored as links; owners are root.
"""
import gzip
import os
import stat
import sys


def entry(out, name, mode, data=b"", ino=[1]):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    hdr = "070701" + "".join(
        "%08X" % v
        for v in (ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
    )
    out.write(hdr.encode() + name_b)
    out.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
    out.write(data)
    out.write(b"\0" * ((4 - len(data) % 4) % 4))


def main():
    root, dest = sys.argv[1], sys.argv[2]
    with gzip.open(dest, "wb", compresslevel=1) as out:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                entry(out, rel, stat.S_IFDIR | 0o755)
            for f in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
                p = os.path.join(dirpath, f)
                name = os.path.normpath(os.path.join(rel, f))
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    entry(out, name, stat.S_IFLNK | 0o777, os.readlink(p).encode())
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as fh:
                        entry(out, name, stat.S_IFREG | (st.st_mode & 0o7777), fh.read())
        entry(out, "TRAILER!!!", 0)


if __name__ == "__main__":
    main()

"""qcow2 cache options on blockdev-add (`cache-size`, `l2-cache-size`,
`refcount-cache-size`, `l2-cache-entry-size`, `cache-clean-interval`),
compared step by step with qemu-storage-daemon 10: refusals (class and
message) and acceptances; sluice's one refusal of its own (an L2 entry
size below the cluster size) is checked for its words."""

import os

from stream_common import qemu_img, qsd_monitor, run_case


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def strip(r):
    if "error" in r:
        return {"error": {"class": r["error"]["class"], "desc": r["error"]["desc"]}}
    return r


OPTS = [
    {"cache-size": 1 << 20, "l2-cache-size": 1 << 20, "refcount-cache-size": 1 << 16},
    {"cache-size": 1 << 20, "l2-cache-size": 2 << 20},
    {"cache-size": 1 << 20, "refcount-cache-size": 2 << 20},
    {"l2-cache-entry-size": 1000},
    {"l2-cache-entry-size": 256},
    {"l2-cache-entry-size": 131072},
    {"cache-clean-interval": 1 << 33},
    {"cache-clean-interval": -1},
    {"l2-cache-size": -1},
    {"l2-cache-size": "1M"},
    {"refcount-cache-size": 1 << 62},
    {"l2-cache-size": 1 << 62},
    {"cache-size": 1 << 20},
    {"cache-size": 1 << 20, "l2-cache-size": 1 << 19, "cache-clean-interval": 5},
    {"refcount-cache-size": 1 << 20, "cache-clean-interval": 0},
    {"l2-cache-entry-size": 65536, "l2-cache-size": 0},
]


def case_qsd(vm, d):
    img = os.path.join(d, "c.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1G")
    f = {"driver": "file", "filename": img}
    with qsd_monitor(d) as qsd:
        for o in OPTS:
            args = {"driver": "qcow2", "node-name": "q", "file": f, **o}
            # One at a time: the image's lock admits one writer.
            replies = []
            for side in (vm, qsd):
                r = strip(side.raw("blockdev-add", args))
                if "return" in r:
                    side.rcmd("blockdev-del", {"node-name": "q"})
                replies.append(r)
            ours, theirs = replies
            expect(ours == theirs, f"{o}: sluice {ours} vs QSD {theirs}")
    r = vm.raw("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": f, "l2-cache-entry-size": 4096})
    expect(r.get("error", {}).get("desc", "").startswith(
        "l2-cache-entry-size 4096 is not supported by sluice"), r)


if __name__ == "__main__":
    run_case(globals())

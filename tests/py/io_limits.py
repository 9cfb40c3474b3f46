"""I/O limits' surfaces in both dialects.

qmp: throttle-group objects and throttle filter nodes compared step by step
with qemu-storage-daemon 10 (replies and refusals, class and message);
block_set_io_throttle (which QSD lacks) against QEMU's own words
(`throttle_is_valid`, `qmp_get_blk`) and query-block's `inserted` members.
spdk: bdev_set_qos_limit through SPDK's Python client: SPDK's refusals and
`assigned_rate_limits`."""

import os
import subprocess

from spdk.rpc.client import JSONRPCClient, JSONRPCException

from stream_common import parse_args, qsd_monitor, run_case


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


OBJECT_STEPS = [
    ("object-add", {"qom-type": "nosuch", "id": "a"}),
    ("object-add", {"qom-type": "throttle-group"}),
    ("object-add", {"qom-type": "throttle-group", "id": "1a"}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "x-foo": 1}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-totalx": 1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-total": "x"}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "x-bps-total": "x"}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-total": 1, "bps-read": 1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-total": 1, "iops-size": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-total": -1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-total-max": 100}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a",
                    "limits": {"iops-read": 100, "iops-read-max": 50}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a",
                    "limits": {"iops-read": 100, "iops-read-max-length": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"iops-read": 100,
                    "iops-read-max": 200, "iops-read-max-length": 0}}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"bps-total": 100}, "x-bps-total": 5}),
    ("object-add", {"qom-type": "throttle-group", "id": "a", "limits": {"iops-total": 10}}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "nope", "file": "n0"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "a", "file": "n0", "x": 1}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "a", "file": "nope"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "a", "file": "n0"}),
    ("object-del", {"id": "a"}),
    ("blockdev-del", {"node-name": "t0"}),
    ("object-del", {"id": "a"}),
    ("object-del", {"id": "a"}),
]


def strip(r):
    """What must match: the reply, or the error's class and message."""
    if "error" in r:
        return {"error": {"class": r["error"]["class"], "desc": r["error"]["desc"]}}
    return r


def case_qmp(vm, d):
    with qsd_monitor(d) as qsd:
        for cmd, args in OBJECT_STEPS:
            ours, theirs = strip(vm.raw(cmd, args)), strip(qsd.raw(cmd, args))
            expect(ours == theirs, f"{cmd} {args}: sluice {ours} vs QSD {theirs}")
    # block_set_io_throttle: QSD has no BlockBackends; QEMU's words.
    vm.rcmd("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": 1 << 20})
    zero = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}

    def err(args, cls, desc):
        r = vm.raw("block_set_io_throttle", args)
        expect("error" in r, f"{args}: {r}")
        expect((r["error"]["class"], r["error"]["desc"]) == (cls, desc), f"{args}: {r}")

    err(zero, "GenericError", "Need exactly one of 'device' and 'id'")
    err({**zero, "device": "a", "id": "b"}, "GenericError", "Need exactly one of 'device' and 'id'")
    err({**zero, "id": "b"}, "GenericError", "qdev IDs/QOM paths exist only in the system emulator")
    err({**zero, "device": "n1", "bps": 1}, "DeviceNotFound", "Device 'n1' not found")
    err({"device": "n1"}, "GenericError", "Parameter 'bps' is missing")
    r = vm.raw("bdev_null_create", {"name": "nd", "num_blocks": 2048, "block_size": 512})
    expect("return" in r, r)
    img = os.path.join(d, "dev.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", img, "1M"], check=True, capture_output=True)
    vm.rcmd("bdev_qcow2_open", {"name": "dev0", "node_name": "img0", "filename": img})
    dev = {**zero, "device": "dev0"}
    err({**dev, "bps": 1, "bps_rd": 1}, "GenericError",
        "bps/iops/max total values and read/write values cannot be used at the same time")
    err({**dev, "iops_size": 4096}, "GenericError", "iops size requires an iops value to be set")
    err({**dev, "bps": -1}, "GenericError", "bps/iops/max values must be within [0, 1000000000000000]")
    err({**dev, "bps_max": 10}, "GenericError", "bps_max/iops_max require corresponding bps/iops values")
    err({**dev, "bps": 10, "bps_max_length": 3}, "GenericError", "burst length set without burst rate")
    vm.rcmd("block_set_io_throttle", {**dev, "bps": 10 << 20, "iops_wr": 100, "iops_wr_max": 200,
                                      "iops_wr_max_length": 3, "iops_size": 8192})

    def inserted():
        blk = [b for b in vm.rcmd("query-block", {}) if b["device"] == "dev0"]
        expect(len(blk) == 1, blk)
        return blk[0]["inserted"]

    ins = inserted()
    want = {"bps": 10 << 20, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 100,
            "iops_wr_max": 200, "iops_wr_max_length": 3, "iops_size": 8192, "group": "dev0"}
    got = {k: ins.get(k) for k in want}
    expect(got == want, f"query-block inserted: {got} vs {want}")
    expect("bps_max" not in ins, ins)
    # A named group: the device moves into it; the group's config is the last set.
    vm.rcmd("object-add", {"qom-type": "throttle-group", "id": "g2", "x-iops-total": 50})
    vm.rcmd("block_set_io_throttle", {**dev, "iops": 70, "group": "g2"})
    ins = inserted()
    expect((ins["group"], ins["iops"], ins["bps"]) == ("g2", 70, 0), ins)
    r = vm.raw("object-del", {"id": "g2"})
    expect(r.get("error", {}).get("desc") == "object 'g2' is in use, can not be deleted", r)
    # All zero lifts the limits: QEMU shows only the six zero rates.
    vm.rcmd("block_set_io_throttle", dev)
    ins = inserted()
    expect("group" not in ins and ins["iops"] == 0, ins)
    vm.rcmd("object-del", {"id": "g2"})


def case_spdk(vm, d):
    c = JSONRPCClient(parse_args().rpc)
    c.call("bdev_malloc_create", {"name": "m0", "num_blocks": 2048, "block_size": 512})

    def refused(params, code, msg):
        try:
            c.call("bdev_set_qos_limit", params)
        except JSONRPCException as e:
            expect(f"'code': {code}" in str(e) or str(code) in str(e), f"{params}: {e}")
            expect(msg in str(e), f"{params}: {e}")
            return
        raise Mismatch(f"bdev_set_qos_limit {params} succeeded")

    refused({"name": "m0"}, -32602, "No rate limits specified")
    refused({"name": "nope", "rw_ios_per_sec": 1000}, -19, "No such device")
    refused({"name": "m0", "rw_ios_per_sec": 1500}, -32602,
            "Failed to configure rate limit: Invalid argument")
    expect(c.call("bdev_set_qos_limit", {"name": "m0", "rw_ios_per_sec": 2000, "r_mbytes_per_sec": 5}),
           "not true")
    # A limit left out keeps its value (SPDK's rule); 0 lifts one.
    c.call("bdev_set_qos_limit", {"name": "m0", "w_mbytes_per_sec": 7, "rw_ios_per_sec": 0})
    lim = c.call("bdev_get_bdevs", {"name": "m0"})[0]["assigned_rate_limits"]
    want = {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 5, "w_mbytes_per_sec": 7}
    expect(lim == want, f"assigned_rate_limits {lim} vs {want}")
    # Deleted and made again: the limits died with the bdev.
    c.call("bdev_malloc_delete", {"name": "m0"})
    c.call("bdev_malloc_create", {"name": "m0", "num_blocks": 2048, "block_size": 512})
    lim = c.call("bdev_get_bdevs", {"name": "m0"})[0]["assigned_rate_limits"]
    expect(set(lim.values()) == {0}, lim)


if __name__ == "__main__":
    run_case(globals())

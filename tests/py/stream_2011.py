"""The 2011 streaming API end to end: block_stream, query-block-stream,
block_stream_cancel, snapshot_blkdev and BLOCK_STREAM_COMPLETED, through QMP
(qemu.qmp) and JSON-RPC (SPDK's client, events via notify_get_notifications)."""

import os
import sys

from spdk.rpc.client import JSONRPCClient, JSONRPCException

from stream_common import Vm, check, compare_raw, depth_at, info, make_chain, parse_args, qmap, reference

a = parse_args()
d = a.dir
vm = Vm(a.qmp)
rpc = JSONRPCClient(a.rpc)


def qmp_error(cmd, args):
    r = vm.raw(cmd, args)
    if not ("error" in r):
        raise AssertionError(r)
    return r["error"]


def rpc_error(method, params):
    try:
        rpc.call(method, params)
    except JSONRPCException as e:
        return e.message
    raise AssertionError(f"{method} succeeded")


# A chain with 64 MiB of data to copy, so a stream runs long enough to be seen.
paths = make_chain(d, ["base", "mid", "top"], "128M",
                   [["write -P 0x1 0 48M"], ["write -P 0x2 40M 16M", "write -z 8M 1M"], ["write -P 0x3 1M 1M"]])
ref = reference(d, paths[-1])
if not (rpc.call("bdev_qcow2_open", {"name": "drive0", "filename": paths[-1]}) == "drive0"):
    raise AssertionError('failed: rpc.call("bdev_qcow2_open", {"name": "drive0", "filename": paths[-1]}) == "drive0"')

# Errors as the 2011 API names them.
e = qmp_error("block_stream", {"device": "nope"})
if not (e == {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}):
    raise AssertionError(e)
e = qmp_error("block_stream_cancel", {"device": "drive0"})
if not (e == {"class": "DeviceNotActive", "desc": "Device 'drive0' has not been activated"}):
    raise AssertionError(e)
solo = os.path.join(d, "solo.qcow2")
make_chain(d, ["solo"], "1M", [])
rpc.call("bdev_qcow2_open", {"name": "solo", "filename": solo})
e = qmp_error("block_stream", {"device": "solo"})
if not (e["class"] == "NotSupported"):
    raise AssertionError(e)
if not ("Device 'nope' not found" in rpc_error("block_stream", {"device": "nope"})):
    raise AssertionError('failed: "Device \'nope\' not found" in rpc_error("block_stream", {"device": "nope"})')

# Start, see it, refuse a second one, cancel (returns once stopped).
if not (vm.rcmd("block_stream", {"device": "drive0"}) == {}):
    raise AssertionError('failed: vm.rcmd("block_stream", {"device": "drive0"}) == {}')
vm.rcmd("block-job-set-speed", {"device": "drive0", "speed": 4 << 20})
s = rpc.call("query-block-stream")
if not (len(s) == 1 and s[0]["device"] == "drive0" and s[0]["len"] == 128 << 20):
    raise AssertionError(s)
e = qmp_error("block_stream", {"device": "drive0"})
if not (e == {"class": "DeviceInUse", "desc": "Device 'drive0' is in use"}):
    raise AssertionError(e)
if not (rpc.call("block_stream_cancel", {"device": "drive0"}) == {}):
    raise AssertionError('failed: rpc.call("block_stream_cancel", {"device": "drive0"}) == {}')
if not (rpc.call("query-block-stream") == []):
    raise AssertionError('failed: rpc.call("query-block-stream") == []')
if not (vm.rcmd("query-block")[0]["inserted"]["backing_file_depth"] == 2):
    raise AssertionError('failed: vm.rcmd("query-block")[0]["inserted"]["backing_file_depth"] == 2')
if not ("has not been activated" in rpc_error("block_stream_cancel", {"device": "drive0"})):
    raise AssertionError('failed: "has not been activated" in rpc_error("block_stream_cancel", {"device": "drive0"})')
if not (vm.events("BLOCK_STREAM_COMPLETED") == []):
    raise AssertionError('failed: vm.events("BLOCK_STREAM_COMPLETED") == []')  # a cancel is not a completion

# Stream again to the end: the event on QMP and as a JSON-RPC notification.
last = rpc.call("notify_get_notifications", {"id": 0, "max": 0})
last_id = last[-1]["id"] if last else 0
if not (rpc.call("block_stream", {"device": "drive0"}) == {}):
    raise AssertionError('failed: rpc.call("block_stream", {"device": "drive0"}) == {}')
ev = vm.event_wait("BLOCK_STREAM_COMPLETED", 120, {"device": "drive0"})
if not (ev["data"] == {"device": "drive0", "len": 128 << 20, "offset": 128 << 20}):
    raise AssertionError(ev)
notes = rpc.call("notify_get_notifications", {"id": last_id + 1, "max": 0})
done = [n for n in notes if n["type"] == "BLOCK_STREAM_COMPLETED"]
if not ([(n["ctx"], n["data"]) for n in done] == [("drive0", ev["data"])]):
    raise AssertionError(notes)
if not (vm.rcmd("query-block")[0]["inserted"]["backing_file_depth"] == 0):
    raise AssertionError('failed: vm.rcmd("query-block")[0]["inserted"]["backing_file_depth"] == 0')

# Live block copy: snapshot_blkdev onto a new image, then stream into it.
copy = os.path.join(d, "copy.qcow2")
e = qmp_error("snapshot_blkdev", {"device": "drive0", "snapshot-file": copy, "format": "vmdk"})
if not (e["class"] == "NotSupported"):
    raise AssertionError(e)
if not (vm.rcmd("snapshot_blkdev", {"device": "drive0", "snapshot-file": copy, "format": "qcow2"}) == {}):
    raise AssertionError('failed: vm.rcmd("snapshot_blkdev", {"device": "drive0", "snapshot-file": copy, "format": "qcow2"}) == {}')
ins = vm.rcmd("query-block")[0]["inserted"]
if not (ins["file"] == copy and ins["backing_file"] == paths[-1]):
    raise AssertionError(ins)
if not (vm.rcmd("block_stream", {"device": "drive0"}) == {}):
    raise AssertionError('failed: vm.rcmd("block_stream", {"device": "drive0"}) == {}')
vm.event_wait("BLOCK_STREAM_COMPLETED", 120, {"device": "drive0"})
vm.close("drive0")
if not ("backing-filename" not in info(copy)):
    raise AssertionError('failed: "backing-filename" not in info(copy)')
check(copy)
compare_raw(copy, ref)
compare_raw(paths[-1], ref)

# With a base: base's sectors are not copied and base becomes the backing file.
p2 = make_chain(d, ["b2", "m2", "t2"], "16M", [["write -P 0x7 0 8M"], ["write -P 0x8 4M 8M"], []])
ref2 = reference(d, p2[-1], "ref2.raw")
rpc.call("bdev_qcow2_open", {"name": "drive1", "filename": p2[-1]})
vm.rcmd("block_stream", {"device": "drive1", "base": p2[0]})
ev = vm.event_wait("BLOCK_STREAM_COMPLETED", 60, {"device": "drive1"})
if not ("error" not in ev["data"]):
    raise AssertionError(ev)
vm.close("drive1")
if not (info(p2[-1])["backing-filename"] == p2[0]):
    raise AssertionError('failed: info(p2[-1])["backing-filename"] == p2[0]')
compare_raw(p2[-1], ref2)
if not (depth_at(p2[-1], 0) == 1 and depth_at(p2[-1], 8 << 20) == 0):
    raise AssertionError(qmap(p2[-1]))

# A failing stream reports through the event's error member.
p3 = make_chain(d, ["b3", "t3"], "8M", [["write -P 0x9 0 8M"], []])
rpc.call("bdev_uring_create", {"name": "b3file", "filename": p3[0]})
rpc.call("bdev_error_create", {"base_name": "b3file"})
rpc.call("bdev_qcow2_open", {"node_name": "b3", "base_bdev": "EE_b3file", "no_backing": True})
rpc.call("bdev_qcow2_open", {"name": "drive2", "filename": p3[1], "backing": "b3"})
host = [e for e in qmap(p3[0]) if e["data"]][0]["offset"]
rpc.call("bdev_error_inject_error", {"name": "EE_b3file", "io_type": "read", "error_type": "failure",
                                     "num": 0, "offset": host, "length": 8 << 20})
vm.rcmd("block_stream", {"device": "drive2"})
ev = vm.event_wait("BLOCK_STREAM_COMPLETED", 60, {"device": "drive2"})
if not (ev["data"]["error"] == "Input/output error" and ev["data"]["offset"] < ev["data"]["len"]):
    raise AssertionError(ev)
# A JSON-RPC client reads the same error from the notification's data.
notes = rpc.call("notify_get_notifications", {"id": 0, "max": 0})
failed = [n["data"] for n in notes if n["type"] == "BLOCK_STREAM_COMPLETED" and n["ctx"] == "drive2"]
if not (failed == [ev["data"]]):
    raise AssertionError(notes)
if not (vm.rcmd("query-block-stream") == []):
    raise AssertionError('failed: vm.rcmd("query-block-stream") == []')
print("ok")

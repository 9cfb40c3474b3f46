"""Phases of the SIGKILL test: start (make a chain, start a slowed stream),
restart (open the half-streamed image, stream again, slowed), finish (open,
stream to the end, judge with qemu-img)."""

import os

from stream_common import Vm, check, compare_raw, info, make_chain, parse_args

a = parse_args()
vm = Vm(a.qmp)
top = os.path.join(a.dir, "top.qcow2")
if a.case == "start":
    paths = make_chain(a.dir, ["base", "mid", "top"], "64M",
                       [["write -P 0x1 0 40M"], ["write -P 0x2 24M 32M", "write -z 30M 1M"], ["write -P 0x3 0 1M"]])
    from stream_common import reference
    reference(a.dir, top)
vm.open(name="drive0", filename=top)
if a.case in ("start", "restart"):
    vm.cmd("block-stream", device="drive0", speed=32 << 20)
else:
    vm.cmd("block-stream", device="drive0")
    vm.wait_until_completed(timeout=300)
    vm.close("drive0")
    if not ("backing-filename" not in info(top)):
        raise AssertionError('failed: "backing-filename" not in info(top)')
    check(top)
    compare_raw(top, os.path.join(a.dir, "ref.raw"))
print("ok")

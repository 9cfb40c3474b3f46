"""QEMU's Python QMP clients against sluice: qemu.qmp.QMPClient (asyncio) and
qemu.qmp.legacy.QEMUMonitorProtocol negotiate, run commands, see errors with
their classes, and receive pushed events."""

import argparse
import asyncio
import os

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

ap = argparse.ArgumentParser()
ap.add_argument("--rpc", required=True)
ap.add_argument("--qmp", required=True)
args = ap.parse_args()


async def modern():
    c = QMPClient("sluice-test")
    await c.connect(args.qmp)
    if not (c.greeting.QMP.capabilities == []):
        raise AssertionError(c.greeting)
    ver = await c.execute("query-version")
    if not (ver["package"].startswith("sluice")):
        raise AssertionError(ver)
    cmds = {x["name"] for x in await c.execute("query-commands")}
    if not ({"query-version", "quit", "bdev_get_bdevs", "qmp_capabilities"} <= cmds):
        raise AssertionError(cmds)
    try:
        await c.execute("no-such-command")
        raise AssertionError("unknown command succeeded")
    except ExecuteError as e:
        if not (e.error_class == "CommandNotFound"):
            raise AssertionError(e.error_class)
    try:
        await c.execute("bdev_get_bdevs", {"name": "missing"})
        raise AssertionError("missing bdev found")
    except ExecuteError as e:
        if not (e.error_class == "DeviceNotFound"):
            raise AssertionError(e.error_class)
    try:
        await c.execute("bdev_null_create", {"name": "Q0", "num_blocks": 8, "block_size": 512, "frobnicate": True})
        raise AssertionError("unknown argument accepted")
    except ExecuteError as e:
        if not (e.error_class == "GenericError" and "frobnicate" in str(e)):
            raise AssertionError(e)
    if not (await c.execute("bdev_get_bdevs") == []):
        raise AssertionError('failed: await c.execute("bdev_get_bdevs") == []')

    with c.listener() as listener:
        # SPDK's notifications (bdev_register) stay on the JSON-RPC side.
        if not (await c.execute("bdev_null_create", {"name": "Q0", "num_blocks": 8, "block_size": 512}) == "Q0"):
            raise AssertionError('failed: await c.execute("bdev_null_create", {"name": "Q0", "num_blocks": 8, "block_size": 512}) == "Q0"')
        try:
            ev = await asyncio.wait_for(listener.get(), 0.5)
            raise AssertionError(f"QMP client got {ev}")
        except asyncio.TimeoutError:
            pass
        # QMP events do arrive: a job's.
        img = os.path.join(os.path.dirname(args.rpc), "q0.img")
        await c.execute("blockdev-create", {"job-id": "c0", "options": {"driver": "file", "filename": img, "size": 0}})
        ev = await asyncio.wait_for(listener.get(), 5)
        if not (ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == "c0"):
            raise AssertionError(ev)
        if not (isinstance(ev["timestamp"]["seconds"], int) and isinstance(ev["timestamp"]["microseconds"], int)):
            raise AssertionError('failed: isinstance(ev["timestamp"]["seconds"], int) and isinstance(ev["timestamp"]["microseconds"], int)')
    bdevs = await c.execute("bdev_get_bdevs")
    if not ([b["name"] for b in bdevs] == ["Q0"]):
        raise AssertionError(bdevs)
    # Concurrent commands on one connection are matched by id.
    res = await asyncio.gather(*[c.execute("bdev_get_bdevs", {"name": "Q0"}) for _ in range(20)])
    if not (all(r[0]["name"] == "Q0" for r in res)):
        raise AssertionError('failed: all(r[0]["name"] == "Q0" for r in res)')
    await c.disconnect()


def legacy():
    q = QEMUMonitorProtocol(args.qmp)
    greeting = q.connect(negotiate=True)
    if not ("QMP" in greeting):
        raise AssertionError(greeting)
    if not (q.cmd("query-version")["package"].startswith("sluice")):
        raise AssertionError('failed: q.cmd("query-version")["package"].startswith("sluice")')
    r = q.cmd_raw("bdev_null_delete", {"name": "nope"})
    if not (r["error"]["class"] == "DeviceNotFound"):
        raise AssertionError(r)
    r = q.cmd_raw("qmp_capabilities")
    if not (r["error"]["class"] == "CommandNotFound"):
        raise AssertionError(r)
    r = q.cmd_obj({"execute": "query-version", "id": "tag-7"})
    if not (r["id"] == "tag-7"):
        raise AssertionError(r)
    q.clear_events()
    if not (q.cmd("bdev_null_delete", name="Q0") is True):
        raise AssertionError('failed: q.cmd("bdev_null_delete", name="Q0") is True')
    try:
        ev = q.pull_event(wait=0.5)
    except (TimeoutError, asyncio.TimeoutError):
        ev = None
    if ev is not None:
        raise AssertionError(f"QMP client got {ev}")
    q.close()


asyncio.run(modern())
legacy()
print("ok")

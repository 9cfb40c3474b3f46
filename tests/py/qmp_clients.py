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
    assert c.greeting.QMP.capabilities == [], c.greeting
    ver = await c.execute("query-version")
    assert ver["package"].startswith("sluice"), ver
    cmds = {x["name"] for x in await c.execute("query-commands")}
    assert {"query-version", "quit", "bdev_get_bdevs", "qmp_capabilities"} <= cmds, cmds
    try:
        await c.execute("no-such-command")
        raise AssertionError("unknown command succeeded")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e.error_class
    try:
        await c.execute("bdev_get_bdevs", {"name": "missing"})
        raise AssertionError("missing bdev found")
    except ExecuteError as e:
        assert e.error_class == "DeviceNotFound", e.error_class
    try:
        await c.execute("bdev_null_create", {"name": "Q0", "num_blocks": 8, "block_size": 512, "frobnicate": True})
        raise AssertionError("unknown argument accepted")
    except ExecuteError as e:
        assert e.error_class == "GenericError" and "frobnicate" in str(e), e
    assert await c.execute("bdev_get_bdevs") == []

    with c.listener() as listener:
        # SPDK's notifications (bdev_register) stay on the JSON-RPC side.
        assert await c.execute("bdev_null_create", {"name": "Q0", "num_blocks": 8, "block_size": 512}) == "Q0"
        try:
            ev = await asyncio.wait_for(listener.get(), 0.5)
            raise AssertionError(f"QMP client got {ev}")
        except asyncio.TimeoutError:
            pass
        # QMP events do arrive: a job's.
        img = os.path.join(os.path.dirname(args.rpc), "q0.img")
        await c.execute("blockdev-create", {"job-id": "c0", "options": {"driver": "file", "filename": img, "size": 0}})
        ev = await asyncio.wait_for(listener.get(), 5)
        assert ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == "c0", ev
        assert isinstance(ev["timestamp"]["seconds"], int) and isinstance(ev["timestamp"]["microseconds"], int)
    bdevs = await c.execute("bdev_get_bdevs")
    assert [b["name"] for b in bdevs] == ["Q0"], bdevs
    # Concurrent commands on one connection are matched by id.
    res = await asyncio.gather(*[c.execute("bdev_get_bdevs", {"name": "Q0"}) for _ in range(20)])
    assert all(r[0]["name"] == "Q0" for r in res)
    await c.disconnect()


def legacy():
    q = QEMUMonitorProtocol(args.qmp)
    greeting = q.connect(negotiate=True)
    assert "QMP" in greeting, greeting
    assert q.cmd("query-version")["package"].startswith("sluice")
    r = q.cmd_raw("bdev_null_delete", {"name": "nope"})
    assert r["error"]["class"] == "DeviceNotFound", r
    r = q.cmd_raw("qmp_capabilities")
    assert r["error"]["class"] == "CommandNotFound", r
    r = q.cmd_obj({"execute": "query-version", "id": "tag-7"})
    assert r["id"] == "tag-7", r
    q.clear_events()
    assert q.cmd("bdev_null_delete", name="Q0") is True
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

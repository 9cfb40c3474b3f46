"""SPDK's own Python client against sluice: spdk.rpc.client.JSONRPCClient (one
connection, many calls, batches) and the spdk-rpc command (single calls, script
mode from stdin, save_config / load_config)."""

import argparse
import json
import os
import subprocess
import sys

from spdk.rpc.client import JSONRPCClient, JSONRPCException

ap = argparse.ArgumentParser()
ap.add_argument("--rpc", required=True)
ap.add_argument("--qmp", required=True)
ap.add_argument("--workdir", required=True)
args = ap.parse_args()

SPDK_RPC = os.path.join(os.path.dirname(sys.executable), "spdk-rpc")
SHAPE = {"name", "aliases", "product_name", "block_size", "num_blocks", "uuid",
         "assigned_rate_limits", "claimed", "zoned", "supported_io_types", "driver_specific"}


def spdk_rpc(*a, stdin=None, ok=True):
    p = subprocess.run([SPDK_RPC, "-s", args.rpc, *a], input=stdin, capture_output=True, text=True, timeout=60)
    if ok:
        if not (p.returncode == 0):
            raise AssertionError(f"spdk-rpc {a} failed ({p.returncode}): {p.stdout} {p.stderr}")
    return p


def expect_error(fn, code):
    try:
        fn()
    except JSONRPCException as e:
        if not (f'"code": {code}' in e.message):
            raise AssertionError(f"expected code {code}, got: {e.message}")
        return e.message
    raise AssertionError(f"expected error {code}, call succeeded")


c = JSONRPCClient(args.rpc)
ver = c.call("spdk_get_version")
if not (ver["version"].startswith("sluice")):
    raise AssertionError(ver)
methods = c.rpc_get_methods(current=True)
for m in ["bdev_malloc_create", "bdev_null_create", "bdev_aio_create", "bdev_uring_create",
          "bdev_error_create", "bdev_get_bdevs", "bdev_get_iostat", "save_config", "notify_get_notifications",
          "thread_get_stats", "thread_get_pollers"]:
    if not (m in methods):
        raise AssertionError(f"{m} not in rpc_get_methods")
# The shape SPDK's `spdk_top` and `rpc.py thread_get_pollers` read.
pollers = c.thread_get_pollers()
if not (pollers["tick_rate"] > 0 and pollers["threads"]):
    raise AssertionError(pollers)
for t in pollers["threads"]:
    if not ({"name", "id", "active_pollers", "timed_pollers", "paused_pollers"} <= set(t)):
        raise AssertionError(t)
    for p in t["active_pollers"] + t["timed_pollers"]:
        if not (p["state"] == "waiting" and p["busy_count"] <= p["run_count"]):
            raise AssertionError(p)

# Create every leaf type with the parameters SPDK's client sends.
if not (c.bdev_malloc_create(num_blocks=2048, block_size=512) == "Malloc0"):
    raise AssertionError('failed: c.bdev_malloc_create(num_blocks=2048, block_size=512) == "Malloc0"')
if not (c.bdev_malloc_create(name="M1", num_blocks=256, block_size=4096, uuid="0b9c8f1e-1111-4222-8333-444455556666") == "M1"):
    raise AssertionError('failed: c.bdev_malloc_create(name="M1", num_blocks=256, block_size=4096, uuid="0b9c8f1e-1111-4222-8333-444455556666") == "M1"')
if not (c.bdev_null_create(name="N0", num_blocks=4096, block_size=512) == "N0"):
    raise AssertionError('failed: c.bdev_null_create(name="N0", num_blocks=4096, block_size=512) == "N0"')
img = os.path.join(args.workdir, "aio.img")
with open(img, "wb") as f:
    f.truncate(4 << 20)
if not (c.bdev_aio_create(filename=img, name="A0", block_size=512, readonly=False, fallocate=False, nowait=False) == "A0"):
    raise AssertionError('failed: c.bdev_aio_create(filename=img, name="A0", block_size=512, readonly=False, fallocate=False, nowait=False) == "A0"')
# A second writer of aio.img would be refused (image locks): U0 has a file of its own.
img2 = os.path.join(args.workdir, "uring.img")
with open(img2, "wb") as f:
    f.truncate(4 << 20)
if not (c.bdev_uring_create(filename=img2, name="U0") == "U0"):
    raise AssertionError('failed: c.bdev_uring_create(filename=img2, name="U0") == "U0"')
if not (c.bdev_error_create(base_name="M1") is True):
    raise AssertionError('failed: c.bdev_error_create(base_name="M1") is True')

bdevs = {b["name"]: b for b in c.bdev_get_bdevs()}
if not (set(bdevs) == {"Malloc0", "M1", "N0", "A0", "U0", "EE_M1"}):
    raise AssertionError(bdevs.keys())
m1 = bdevs["M1"]
if not (SHAPE <= set(m1)):
    raise AssertionError(SHAPE - set(m1))
if not (m1["uuid"] == "0b9c8f1e-1111-4222-8333-444455556666"):
    raise AssertionError('failed: m1["uuid"] == "0b9c8f1e-1111-4222-8333-444455556666"')
if not (m1["block_size"] == 4096 and m1["num_blocks"] == 256):
    raise AssertionError('failed: m1["block_size"] == 4096 and m1["num_blocks"] == 256')
if not (m1["product_name"] == "Malloc disk"):
    raise AssertionError('failed: m1["product_name"] == "Malloc disk"')
if not (m1["claimed"] is True):
    raise AssertionError("M1 is claimed by EE_M1")
if not (m1["supported_io_types"]["read"] and m1["supported_io_types"]["write_zeroes"]):
    raise AssertionError('failed: m1["supported_io_types"]["read"] and m1["supported_io_types"]["write_zeroes"]')
if not (bdevs["A0"]["num_blocks"] == (4 << 20) // 512):
    raise AssertionError('failed: bdevs["A0"]["num_blocks"] == (4 << 20) // 512')
if not (bdevs["EE_M1"]["driver_specific"]["error"]["base_bdev"] == "M1"):
    raise AssertionError('failed: bdevs["EE_M1"]["driver_specific"]["error"]["base_bdev"] == "M1"')
one = c.bdev_get_bdevs(name="N0")
if not (len(one) == 1 and one[0]["name"] == "N0"):
    raise AssertionError('failed: len(one) == 1 and one[0]["name"] == "N0"')

# SPDK's error codes.
expect_error(lambda: c.bdev_get_bdevs(name="nope"), -19)
expect_error(lambda: c.bdev_null_create(name="N0", num_blocks=8, block_size=512), -17)
expect_error(lambda: c.bdev_malloc_delete(name="M1"), -16)
msg = expect_error(lambda: c.bdev_malloc_create(num_blocks="x", block_size=512), -32602)
if not ("num_blocks" in msg):
    raise AssertionError(msg)
expect_error(lambda: c.call("no_such_method"), -32601)

c.bdev_error_inject_error(name="EE_M1", io_type="read", error_type="failure", num=1)
rules = c.bdev_get_bdevs(name="EE_M1")[0]["driver_specific"]["error"]["rules"]
if not (len(rules) == 1):
    raise AssertionError(rules)
c.bdev_error_inject_error(name="EE_M1", io_type="clear", error_type="failure")

st = c.bdev_get_iostat()
if not (st["tick_rate"] > 0 and {b["name"] for b in st["bdevs"]} == set(bdevs)):
    raise AssertionError('failed: st["tick_rate"] > 0 and {b["name"] for b in st["bdevs"]} == set(bdevs)')
st = c.bdev_get_iostat(names=["N0"], per_channel=True)
if not (st["name"] == "N0" and isinstance(st["channels"], list)):
    raise AssertionError('failed: st["name"] == "N0" and isinstance(st["channels"], list)')

# Many calls on one connection (the client keeps its socket).
for i in range(200):
    if not (c.bdev_get_bdevs(name="Malloc0")[0]["name"] == "Malloc0"):
        raise AssertionError('failed: c.bdev_get_bdevs(name="Malloc0")[0]["name"] == "Malloc0"')

# A JSON-RPC batch (SPDK's batch mode sends one array).
b = JSONRPCClient(args.rpc, batch_mode=True)
b.bdev_null_create(name="B0", num_blocks=8, block_size=512)
b.bdev_null_create(name="B1", num_blocks=8, block_size=512)
b.bdev_null_create(name="B0", num_blocks=8, block_size=512)
if not (b.send_batch()):
    raise AssertionError('failed: b.send_batch()')
results, errors = JSONRPCClient.handle_batch_response(b.recv())
if not (results == ["B0", "B1"]):
    raise AssertionError(results)
if not (len(errors) == 1 and errors[0]["code"] == -17):
    raise AssertionError(errors)
b.close()

# Notifications.
notes = c.notify_get_notifications(id=0)
regs = [n["ctx"] for n in notes if n["type"] == "bdev_register"]
if not (regs[:6] == ["Malloc0", "M1", "N0", "A0", "U0", "EE_M1"]):
    raise AssertionError(regs)
if not ([n["id"] for n in notes] == list(range(len(notes)))):
    raise AssertionError('failed: [n["id"] for n in notes] == list(range(len(notes)))')

# The spdk-rpc command: single calls, exit status, script mode.
out = spdk_rpc("bdev_malloc_create", "-b", "CliM", "4", "512").stdout.strip()
if not (out == "CliM"):
    raise AssertionError(out)
got = json.loads(spdk_rpc("bdev_get_bdevs", "-b", "CliM").stdout)
if not (got[0]["num_blocks"] == 4 * 1024 * 1024 // 512):
    raise AssertionError('failed: got[0]["num_blocks"] == 4 * 1024 * 1024 // 512')
spdk_rpc("bdev_malloc_delete", "CliM")
p = spdk_rpc("bdev_malloc_delete", "CliM", ok=False)
if not (p.returncode != 0 and "-19" in p.stdout):
    raise AssertionError(p.stdout)
script = "\n".join(f"bdev_null_create S{i} 1 512" for i in range(20)) + "\n"
spdk_rpc(stdin=script)
names = {b["name"] for b in c.bdev_get_bdevs()}
if not (all(f"S{i}" in names for i in range(20))):
    raise AssertionError('failed: all(f"S{i}" in names for i in range(20))')

# save_config through SPDK's client, then load_config restores what was deleted.
cfg = json.loads(spdk_rpc("save_config").stdout)
bdev_sub = [s for s in cfg["subsystems"] if s["subsystem"] == "bdev"][0]
methods = [e["method"] for e in bdev_sub["config"]]
if not (methods.index("bdev_malloc_create") < methods.index("bdev_error_create")):
    raise AssertionError(methods)
c.bdev_error_delete(name="EE_M1")
c.bdev_malloc_delete(name="M1")
for i in range(20):
    c.bdev_null_delete(name=f"S{i}")
cfg_path = os.path.join(args.workdir, "cfg.json")
only_missing = {"subsystems": [{"subsystem": "bdev", "config": [
    e for e in bdev_sub["config"] if e["params"].get("name", e["params"].get("base_name")) in
    {"M1"} | {f"S{i}" for i in range(20)} or e["method"] == "bdev_error_create"]}]}
with open(cfg_path, "w") as f:
    json.dump(only_missing, f)
spdk_rpc("load_config", "-j", cfg_path)
after = {b["name"]: b for b in c.bdev_get_bdevs()}
if not ("EE_M1" in after and after["M1"]["uuid"] == "0b9c8f1e-1111-4222-8333-444455556666"):
    raise AssertionError('failed: "EE_M1" in after and after["M1"]["uuid"] == "0b9c8f1e-1111-4222-8333-444455556666"')
if not (all(f"S{i}" in after for i in range(20))):
    raise AssertionError('failed: all(f"S{i}" in after for i in range(20))')

for n in ["EE_M1"]:
    c.bdev_error_delete(name=n)
for n in ["Malloc0", "M1"]:
    c.bdev_malloc_delete(name=n)
c.bdev_aio_delete(name="A0")
c.bdev_uring_delete(name="U0")
c.close()
print("ok")

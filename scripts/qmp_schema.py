#!/usr/bin/env python3
"""Writes rpc/src/qmp/schema.json, what sluice's `query-qmp-schema` answers.

Run it after registering a QMP command (or emitting a new event), with a
sluice built from the tree running:

    sluice serve --runtime-dir /tmp/s &
    .venv/bin/python scripts/qmp_schema.py --qmp /tmp/s/sluice-qmp.sock

It starts a qemu-storage-daemon 10 and takes its `query-qmp-schema`
(QEMU's SchemaInfo list, type names masked as QEMU masks them), then keeps:

- every command of sluice's `query-commands` that QEMU has, with the
  types it reaches; a command's top-level arguments are only those sluice
  accepts (each is sent alone to the running sluice; "Parameter 'X' is
  unexpected" drops it);
- QEMU's events in `QEMU_EVENTS` (those sluice publishes);
- sluice's own commands (SPDK's JSON-RPC methods, the 2011 API) and events,
  with the feature `sluice-params`: their arguments are SPDK's (see
  docs), not introspected, so the entry has an object type without members.

tests/py/qmp_surface.py (`case_schema`) proves the result true against the
binary: the command lists equal, every listed argument accepted, an
unlisted one refused, every type referenced defined.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "py"))
from stream_common import Vm, qsd_monitor  # noqa: E402

# QEMU's events sluice publishes (rpc/src/methods/job_qapi.rs, nbd, service).
QEMU_EVENTS = [
    "BLOCK_EXPORT_DELETED", "BLOCK_IMAGE_CORRUPTED", "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING", "BLOCK_JOB_READY",
    "JOB_STATUS_CHANGE",
]
# Events sluice publishes that qemu-storage-daemon's schema lacks.
OWN_EVENTS = ["BLOCK_STREAM_COMPLETED", "SHUTDOWN"]
OWN_ARGS = "sluice-params"
PROBE = {"x-schema-probe": True}


def reached(by_name, roots):
    """Every type name reachable from `roots`."""
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in seen or n not in by_name:
            continue
        seen.add(n)
        e = by_name[n]
        for k in ("arg-type", "ret-type", "element-type"):
            if k in e:
                todo.append(e[k])
        for m in e.get("members", []):
            if "type" in m:
                todo.append(m["type"])
        for v in e.get("variants", []):
            todo.append(v["type"])
    return seen


def accepted(vm, cmd, member):
    r = vm.raw(cmd, {member: PROBE})
    desc = r.get("error", {}).get("desc", "")
    return f"'{member}' is unexpected" not in desc and f"unknown field `{member}`" not in desc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qmp", required=True, help="a running sluice's QMP socket")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "rpc", "src", "qmp",
                                                   "schema.json"))
    a = ap.parse_args()
    with qsd_monitor(os.path.dirname(os.path.abspath(a.qmp))) as qsd:
        schema = qsd.raw("query-qmp-schema")["return"]
    by_name = {e["name"]: e for e in schema}
    vm = Vm(a.qmp)
    served = sorted({c["name"] for c in vm.raw("query-commands")["return"]} | {"query-qmp-schema"})
    qemu_cmds = [c for c in served if by_name.get(c, {}).get("meta-type") == "command"]
    own_cmds = [c for c in served if c not in qemu_cmds]
    out = {}
    for c in qemu_cmds:
        e = dict(by_name[c])
        arg = by_name[e["arg-type"]]
        if arg["meta-type"] == "object" and "variants" not in arg and arg.get("members"):
            kept = [m for m in arg["members"] if accepted(vm, c, m["name"])]
            if len(kept) != len(arg["members"]):
                # A type of its own: others may share QEMU's.
                name = f"{c}-arg"
                out[name] = {**arg, "name": name, "members": kept}
                e["arg-type"] = name
        out[c] = e
    for ev in QEMU_EVENTS:
        out[ev] = by_name[ev]
    # From QEMU's own entries (a renamed argument type reaches what QEMU's does).
    roots = [t for n in qemu_cmds + QEMU_EVENTS for t in (by_name[n].get("arg-type"), by_name[n].get("ret-type")) if t]
    types = reached(by_name, roots) - {by_name[c]["arg-type"] for c in qemu_cmds if f"{c}-arg" in out}
    for t in types:
        out.setdefault(t, by_name[t])
    out[OWN_ARGS] = {"name": OWN_ARGS, "meta-type": "object", "members": []}
    out.setdefault("any", by_name["any"])
    for c in own_cmds:
        out[c] = {"name": c, "meta-type": "command", "arg-type": OWN_ARGS, "ret-type": "any",
                  "features": ["sluice-params"]}
    for ev in OWN_EVENTS:
        out[ev] = {"name": ev, "meta-type": "event", "arg-type": OWN_ARGS, "features": ["sluice-params"]}
    order = {"command": 0, "event": 1}
    entries = sorted(out.values(), key=lambda e: (order.get(e["meta-type"], 2), e["name"]))
    with open(a.out, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(e, sort_keys=True) for e in entries) + "\n]\n")
    print(f"{len(entries)} entries: {len(qemu_cmds)} QEMU commands, {len(own_cmds)} sluice commands -> {a.out}")


if __name__ == "__main__":
    main()

"""Streaming's rough edges, each compared with qemu-storage-daemon 10 doing
the same: job verbs whose status a query sees at once, `block-stream`'s
arguments and their errors, `block_resize`."""

import os
import time

from stream_common import (check, compare_raw, info, make_chain, qemu_img, qemu_io, qsd_monitor, reference,
                           run_case)


def add_top(vm, d, name="top"):
    vm.rcmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                             "file": {"driver": "file", "filename": os.path.join(d, f"{name}.qcow2")}})


def brief(vm, jid="j"):
    """(status, paused) of job `jid` as query-block-jobs shows it, or None when gone."""
    for j in vm.jobs():
        if j["device"] == jid:
            return (j["status"], j["paused"])
    return None


def verbs_script(vm, d):
    """Every verb on a stream, with what a query sees right after each reply."""
    add_top(vm, d)
    out = []

    def step(cmd, args, settle=0.2):
        r = vm.raw(cmd, args)
        out.append((cmd, r.get("error", {}).get("desc", "ok"), brief(vm)))
        # QEMU changes the status in the command when the job sleeps (its
        # speed limit) rather than waits for I/O: let both get there.
        time.sleep(settle)

    step("block-stream", {"job-id": "j", "device": "top", "speed": 1 << 20})
    step("block-job-pause", {"device": "j"})
    step("block-job-pause", {"device": "j"})
    step("block-job-resume", {"device": "j"})
    step("block-job-resume", {"device": "j"})
    step("job-pause", {"id": "j"})
    step("job-resume", {"id": "j"})
    step("job-pause", {"id": "j"})
    step("block-job-set-speed", {"device": "j", "speed": 2 << 20})
    step("job-resume", {"id": "j"})
    step("job-pause", {"id": "j"})
    step("block-job-cancel", {"device": "j"})
    step("job-cancel", {"id": "j"})
    vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": "j", "status": "null"})
    # Manual finalize and dismiss.
    step("block-stream", {"job-id": "j", "device": "top", "auto-finalize": False, "auto-dismiss": False})
    vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": "j", "status": "pending"})
    out.append(("pending", "ok", brief(vm)))
    step("job-finalize", {"id": "j"})
    step("job-dismiss", {"id": "j"})
    return out


def case_verbs(vm, d):
    want_d = os.path.join(d, "qsd")
    os.makedirs(want_d)
    for dd in (d, want_d):
        make_chain(dd, ["base", "top"], "64M", [["write -P 0x11 0 64M"], []])
    with qsd_monitor(want_d) as qsd:
        want = verbs_script(qsd, want_d)
    got = verbs_script(vm, d)
    if got != want:
        raise AssertionError("\n".join(f"sluice {g}\nqsd    {w}" for g, w in zip(got, want)))
    check(os.path.join(d, "top.qcow2"))


# --- block-stream's arguments and the job verbs', compared with QSD ---------

ARG_CASES = [
    ("block-stream", {"job-id": "j", "device": "top", "bogus": 1}),
    ("block-stream", {"job-id": "j", "device": "top", "speed": "x"}),
    ("block-stream", {"job-id": "j", "device": "top", "speed": -1}),
    ("block-stream", {"job-id": "j", "device": "top", "speed": 1.5}),
    ("block-stream", {"job-id": "j", "device": 5}),
    ("block-stream", {"job-id": 5, "device": "top"}),
    ("block-stream", {"job-id": "j"}),
    ("block-stream", {"job-id": "j", "device": "top", "on-error": "bad"}),
    ("block-stream", {"job-id": "j", "device": "top", "on-error": 1}),
    ("block-stream", {"job-id": "j", "device": "top", "auto-finalize": "yes"}),
    ("block-stream", {"job-id": "j", "device": "top", "backing-mask-protocol": "yes"}),
    ("block-stream", {"job-id": "j", "device": "top", "base": 1}),
    ("block-stream", {"job-id": "j", "device": "top", "filter-node-name": 3}),
    ("block-stream", {"job-id": "j", "device": "top", "filter-node-name": "1bad"}),
    ("block-stream", {"job-id": "j", "device": "top", "filter-node-name": "top"}),
    # Accepted by QEMU, so by sluice.
    ("block-stream", {"job-id": "j", "device": "top", "on-error": "auto", "speed": 1}),
    ("block-job-pause", {"device": "j", "x": 1}),
    ("block-job-pause", {}),
    ("job-pause", {"id": 1}),
    ("block-job-set-speed", {"device": "j", "speed": "1"}),
    ("block-job-set-speed", {"device": "j"}),
    ("block-job-set-speed", {"device": "j", "speed": -1}),
    ("block-job-cancel", {"device": "j", "force": "1"}),
    ("job-cancel", {"id": "j", "force": True}),
    ("job-finalize", {"id": "j", "x": None}),
    ("job-cancel", {"id": "j"}),
    ("wait-null", None),
    ("block-stream", {"job-id": "j", "device": "top", "filter-node-name": "cor0", "speed": 1}),
    ("job-cancel", {"id": "j"}),
    ("wait-null", None),
    ("block-stream", {"job-id": "j", "device": "top", "backing-mask-protocol": True, "speed": 1}),
    ("job-cancel", {"id": "j"}),
    ("wait-null", None),
]


def run_args(vm, d):
    add_top(vm, d)
    out = []
    for cmd, args in ARG_CASES:
        if cmd == "wait-null":
            vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": "j", "status": "null"})
            # QEMU drops the stream's copy-on-read filter (and the node's
            # blocker) a moment after the job is gone.
            time.sleep(0.3)
            continue
        r = vm.raw(cmd, args)
        out.append((cmd, args, r["error"] if "error" in r else "ok"))
    return out


def case_stream_args(vm, d):
    want_d = os.path.join(d, "qsd")
    os.makedirs(want_d)
    for dd in (d, want_d):
        make_chain(dd, ["base", "top"], "4M", [["write -P 0x11 0 4M"], []])
    with qsd_monitor(want_d) as qsd:
        want = run_args(qsd, want_d)
    got = run_args(vm, d)
    wrong = [f"sluice {g}\nqsd    {w}" for g, w in zip(got, want) if g != w]
    if wrong or len(got) != len(want):
        raise AssertionError("\n".join(wrong))
    check(os.path.join(d, "top.qcow2"))


# --- a zero-length raw backing file ------------------------------------------

def empty_raw_chain(d):
    base = os.path.join(d, "empty.raw")
    open(base, "wb").close()
    top = os.path.join(d, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 1M 64k", top)
    return top, reference(d, top)


def empty_raw_script(vm, d):
    top, _ = empty_raw_chain(d)
    out = []
    for cmd, args in [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}}),
        ("block-stream", {"job-id": "j", "device": "top"}),
    ]:
        r = vm.raw(cmd, args)
        out.append((cmd, r.get("error", "ok")))
    ev = vm.event_wait("BLOCK_JOB_COMPLETED", 20)["data"]
    out.append(("BLOCK_JOB_COMPLETED", ev.get("error"), ev["offset"], ev["len"]))
    out.append(("blockdev-del", vm.raw("blockdev-del", {"node-name": "top"}).get("error", "ok")))
    return out


def case_empty_raw_backing(vm, d):
    want_d = os.path.join(d, "qsd")
    os.makedirs(want_d)
    with qsd_monitor(want_d) as qsd:
        want = empty_raw_script(qsd, want_d)
    got = empty_raw_script(vm, d)
    if got != want:
        raise AssertionError(f"\nsluice {got}\nqsd    {want}")
    top = os.path.join(d, "top.qcow2")
    check(top)
    if not ("backing-filename" not in info(top)):
        raise AssertionError(info(top))
    compare_raw(top, os.path.join(d, "ref.raw"))


run_case(globals())

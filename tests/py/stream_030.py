"""The scenarios of QEMU's streaming tests (qemu-iotests 030) against sluice,
through qemu.qmp; images judged by qemu-img. One scenario per run (--case)."""

import os
import time

from stream_common import (run_case, check, compare_raw, depth_at, info, make_chain, qemu_img, qmap,
                           reference)

SIZE = "32M"
# base, mid, top: data in every layer, a zero cluster range in mid over base data.
WRITES = [
    ["write -P 0x1 0 4M", "write -P 0x2 16M 2M"],
    ["write -P 0x3 2M 4M", "write -z 17M 512k", "write -P 0x4 24M 1M"],
    ["write -P 0x5 3M 64k"],
]


def chain3(d):
    paths = make_chain(d, ["base", "mid", "top"], SIZE, WRITES)
    return paths, reference(d, paths[-1])


def chain_nodes(vm, d):
    paths, ref = chain3(d)
    vm.open_nodes(paths, ["base", "mid", "top"], device="drive0")
    return paths, ref


def err(r):
    assert "error" in r, r
    return r["error"]


def case_stream(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    assert vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2
    vm.cmd("block-stream", device="drive0")
    ev = vm.wait_until_completed()
    assert ev["len"] == 32 << 20 and ev["speed"] == 0, ev
    vm.assert_no_active_block_jobs()
    ins = vm.cmd("query-block")[0]["inserted"]
    assert ins["backing_file_depth"] == 0 and "backing_file" not in ins, ins
    statuses = vm.statuses("drive0")
    assert statuses == ["created", "running", "waiting", "pending", "concluded", "null"], statuses
    vm.close("drive0")
    assert "backing-filename" not in info(paths[-1])
    check(paths[-1])
    compare_raw(paths[-1], ref)
    # The zero range of mid (over base data) did not become data in top.
    m = [e for e in qmap(paths[-1]) if e["start"] <= 17 << 20 < e["start"] + e["length"]][0]
    assert m["zero"] and not m["data"], m


def case_intermediate(vm, d):
    paths, ref = chain_nodes(vm, d)
    vm.cmd("block-stream", device="mid", job_id="stream-mid")
    vm.wait_until_completed(drive="stream-mid")
    vm.assert_no_active_block_jobs()
    assert vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1
    vm.close("drive0")
    assert "backing-filename" not in info(paths[1])
    assert info(paths[2])["backing-filename"] == paths[1]
    for p in paths[1:]:
        check(p)
    compare_raw(paths[2], ref)
    compare_raw(paths[1], reference(d, paths[1], "mid-after.raw"))


def case_pause(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    vm.cmd("block-stream", device="drive0", speed=512 << 10)
    vm.cmd("block-job-pause", device="drive0")
    j = vm.pause_wait("drive0")
    assert j["status"] == "paused", j
    offset = j["offset"]
    time.sleep(0.5)
    j = vm.job("drive0")
    assert j["offset"] == offset and j["paused"], (offset, j)
    r = vm.qmp("block-job-pause", device="drive0")
    assert err(r)["desc"] == "Job is already paused", r
    vm.cmd("block-job-resume", device="drive0")
    vm.cmd("block-job-set-speed", device="drive0", speed=0)
    vm.wait_until_completed()
    statuses = vm.statuses("drive0")
    assert "paused" in statuses and statuses[-1] == "null", statuses
    vm.close("drive0")
    compare_raw(paths[-1], ref)
    check(paths[-1])


def case_noop(vm, d):
    paths, ref = chain_nodes(vm, d)
    before = qmap(paths[-1])
    vm.cmd("block-stream", device="drive0", base_node="mid")
    ev = vm.wait_until_completed()
    assert ev["len"] == ev["offset"], ev
    vm.close("drive0")
    assert qmap(paths[-1]) == before
    assert info(paths[-1])["backing-filename"] == paths[1]
    compare_raw(paths[-1], ref)


def case_partial(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    vm.cmd("block-stream", device="drive0", base=paths[0])
    vm.wait_until_completed()
    assert vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1
    vm.close("drive0")
    i = info(paths[-1])
    assert i["backing-filename"] == paths[0], i  # the base's file name as opened (absolute)
    check(paths[-1])
    compare_raw(paths[-1], ref)
    assert depth_at(paths[-1], 0) == 1, qmap(paths[-1])  # base-only data stays in base
    assert depth_at(paths[-1], 2 << 20) == 0, qmap(paths[-1])  # mid's data was copied


def case_backing_file(vm, d):
    paths, ref = chain_nodes(vm, d)
    r = vm.qmp("block-stream", device="drive0", backing_file="base.qcow2")
    assert err(r)["desc"] == "backing file specified, but streaming the entire chain", r
    vm.cmd("block-stream", device="drive0", base_node="base", backing_file="base.qcow2")
    vm.wait_until_completed()
    vm.close("drive0")
    assert info(paths[-1])["backing-filename"] == "base.qcow2"
    compare_raw(paths[-1], ref)


def case_device_not_found(vm, d):
    r = vm.qmp("block-stream", device="nonexistent")
    e = err(r)
    assert e["class"] == "GenericError", e
    assert e["desc"] == "Cannot find device='nonexistent' nor node-name='nonexistent'", e


def case_job_id_missing(vm, d):
    chain_nodes(vm, d)
    r = vm.qmp("block-stream", device="mid")
    assert err(r)["desc"] == "Invalid job ID ''", r
    vm.assert_no_active_block_jobs()


def case_read_only(vm, d):
    paths, _ = chain_nodes(vm, d)
    ro = os.path.join(d, "ro-top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", ro, SIZE)
    vm.open(node_name="ro-top", filename=ro, backing="mid", read_only=True)
    r = vm.qmp("block-stream", job_id="stream", device="ro-top", base_node="base")
    assert err(r)["desc"] == "Block node is read-only", r


def nine(vm, d):
    names = [f"node{i}" for i in range(9)]
    writes = [["write -P 0x9 0 8M"]] + [[f"write -P {i} {i * 512}k 512k"] for i in range(1, 9)]
    paths = make_chain(d, names, "8M", writes)
    ref = reference(d, paths[-1])
    vm.open_nodes(paths, names, device="drive0")
    return paths, ref


def case_parallel(vm, d):
    paths, ref = nine(vm, d)
    jobs = []
    for i in range(2, 9, 2):
        jid = f"stream-node{i}"
        vm.cmd("block-stream", device=f"node{i}", job_id=jid, bottom=f"node{i - 1}", speed=1024)
        jobs.append(jid)
    assert sorted(j["device"] for j in vm.jobs()) == sorted(jobs)
    for jid in reversed(jobs):
        vm.cmd("block-job-set-speed", device=jid, speed=0)
    for jid in jobs:
        vm.wait_until_completed(drive=jid)
    vm.assert_no_active_block_jobs()
    vm.close("drive0")
    for i in range(2, 9, 2):
        assert info(paths[i])["backing-filename"] == paths[i - 2], info(paths[i])
        check(paths[i])
        compare_raw(paths[i], reference(d, paths[i], f"n{i}.raw"))
    compare_raw(paths[-1], ref)


def case_overlapping(vm, d):
    paths, ref = nine(vm, d)
    vm.cmd("block-stream", device="node4", job_id="stream-node4", base=paths[1], speed=1 << 20)
    busy = "Node '{}' is busy: block device is in use by block job: stream"
    r = vm.qmp("block-stream", device="node5", job_id="stream-node5", base=paths[2])
    assert err(r)["desc"] == busy.format("node4"), r
    r = vm.qmp("block-stream", device="node3", job_id="stream-node3", base=paths[2])
    assert err(r)["desc"] == busy.format("node3"), r
    r = vm.qmp("block-stream", device="node4", job_id="stream-node4-v2")
    assert err(r)["desc"] == busy.format("node4"), r
    r = vm.qmp("block-stream", device="node6", job_id="stream-node4", base_node="node5")
    assert err(r)["desc"] == "Job ID 'stream-node4' already in use", r
    # Above the job's nodes is free.
    vm.cmd("block-stream", device="node6", job_id="stream-node6", base_node="node4")
    vm.wait_until_completed(drive="stream-node6")
    vm.cmd("block-job-cancel", device="stream-node4")
    ev = vm.event_wait("BLOCK_JOB_CANCELLED", 30, {"device": "stream-node4"})
    assert ev["data"]["offset"] <= ev["data"]["len"], ev
    vm.assert_no_active_block_jobs()
    vm.close("drive0")
    compare_raw(paths[-1], ref)
    assert info(paths[4])["backing-filename"] == paths[3]


def case_base_node_errors(vm, d):
    paths, _ = nine(vm, d)
    cases = [
        (dict(device="node4", base_node="none", job_id="stream"), "Cannot find device='' nor node-name='none'"),
        (dict(device="node4", base_node="node6", job_id="stream"), "Node 'node6' is not a backing image of 'node4'"),
        (dict(device="node4", base_node="node4", job_id="stream"), "Node 'node4' is not a backing image of 'node4'"),
        (dict(device="node4", base_node="node2", base=paths[2], job_id="stream"),
         "'base' and 'base-node' cannot be specified at the same time"),
        (dict(device="node4", bottom="node6", job_id="stream"), "Node 'node6' is not in a chain starting from 'node4'"),
        (dict(device="node4", bottom="node2", base=paths[1], job_id="stream"),
         "'base' and 'bottom' cannot be specified at the same time"),
        (dict(device="node4", base="/no/such.qcow2", job_id="stream"), "Can't find '/no/such.qcow2' in the backing chain"),
        (dict(device="node4", job_id="stream", on_error="sometimes"), "Parameter 'on-error' does not accept value 'sometimes'"),
    ]
    for kw, want in cases:
        r = vm.qmp("block-stream", **kw)
        assert err(r)["desc"] == want, (kw, r)
    vm.assert_no_active_block_jobs()


def case_smaller_backing(vm, d):
    base = os.path.join(d, "small.qcow2")
    top = os.path.join(d, "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    from stream_common import qemu_io
    qemu_io("-f", "qcow2", "-c", "write -P 0x1 0 1M", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "2M")
    ref = reference(d, top)
    vm.open(name="drive0", filename=top)
    vm.cmd("block-stream", device="drive0")
    vm.wait_until_completed()
    vm.close("drive0")
    assert "backing-filename" not in info(top)
    compare_raw(top, ref)
    check(top)


def error_chain(vm, d, error_type, on_error):
    """Chain whose base sits on an error bdev failing one read of base-only data."""
    paths, ref = chain3(d)
    vm.rcmd("bdev_uring_create", {"name": "basefile", "filename": paths[0]})
    vm.rcmd("bdev_error_create", {"base_name": "basefile"})
    vm.open(node_name="base", base_bdev="EE_basefile", no_backing=True)
    vm.open(node_name="mid", filename=paths[1], backing="base")
    vm.open(name="drive0", node_name="top", filename=paths[2], backing="mid")
    host = [e for e in qmap(paths[0]) if e["data"] and e["start"] == 0][0]["offset"]
    vm.rcmd("bdev_error_inject_error", {"name": "EE_basefile", "io_type": "read", "error_type": error_type,
                                        "num": 1, "offset": host, "length": 1 << 20})
    vm.cmd("block-stream", device="drive0", on_error=on_error)
    return paths, ref


def case_on_error_report(vm, d):
    paths, ref = error_chain(vm, d, "failure", "report")
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    assert ev["data"] == {"device": "drive0", "operation": "read", "action": "report"}, ev
    c = vm.wait_until_completed(error="Input/output error")
    assert c["offset"] < c["len"], c
    vm.assert_no_active_block_jobs()
    vm.close("drive0")
    assert info(paths[-1])["backing-filename"] == paths[1]
    compare_raw(paths[-1], ref)
    check(paths[-1])


def case_on_error_ignore(vm, d):
    paths, ref = error_chain(vm, d, "failure", "ignore")
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    assert ev["data"]["action"] == "ignore", ev
    c = vm.wait_until_completed(error="Input/output error")
    assert c["offset"] == c["len"], c
    vm.close("drive0")
    assert info(paths[-1])["backing-filename"] == paths[1]
    compare_raw(paths[-1], ref)


def stop_then_resume(vm, paths, ref, io_status):
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    assert ev["data"]["action"] == "stop", ev
    j = vm.pause_wait("drive0")
    assert j["status"] == "paused" and j["io-status"] == io_status, j
    vm.cmd("block-job-resume", device="drive0")
    assert vm.job("drive0")["io-status"] == "ok"
    vm.wait_until_completed()
    vm.close("drive0")
    assert "backing-filename" not in info(paths[-1])
    compare_raw(paths[-1], ref)
    check(paths[-1])


def case_on_error_stop(vm, d):
    paths, ref = error_chain(vm, d, "failure", "stop")
    stop_then_resume(vm, paths, ref, "failed")


def case_on_error_enospc(vm, d):
    paths, ref = error_chain(vm, d, "enospc", "enospc")
    stop_then_resume(vm, paths, ref, "nospace")


def case_on_error_enospc_eio(vm, d):
    error_chain(vm, d, "failure", "enospc")
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    assert ev["data"]["action"] == "report", ev
    vm.wait_until_completed(error="Input/output error")


def case_cancel_paused(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    vm.cmd("block-stream", device="drive0", speed=1 << 20)
    vm.cmd("block-job-pause", device="drive0")
    vm.pause_wait("drive0")
    # QEMU refuses to cancel a paused job without force (qemu-storage-daemon
    # 10 answers the same).
    r = vm.qmp("block-job-cancel", device="drive0")
    assert err(r)["desc"] == "The block job for device 'drive0' is currently paused", r
    vm.cmd("block-job-cancel", device="drive0", force=True)
    ev = vm.event_wait("BLOCK_JOB_CANCELLED", 30, {"device": "drive0"})
    assert ev["data"]["type"] == "stream", ev
    vm.assert_no_active_block_jobs()
    assert vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2
    # A later stream finishes the job.
    vm.cmd("block-stream", device="drive0")
    vm.wait_until_completed()
    vm.close("drive0")
    compare_raw(paths[-1], ref)
    check(paths[-1])


def case_set_speed(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    r = vm.qmp("block-stream", device="drive0", speed=-1)
    assert err(r)["desc"] == "Parameter 'speed' expects a non-negative value", r
    vm.assert_no_active_block_jobs()
    vm.cmd("block-stream", device="drive0", speed=1 << 20)
    assert vm.job("drive0")["speed"] == 1 << 20
    vm.cmd("block-job-set-speed", device="drive0", speed=8 << 20)
    assert vm.job("drive0")["speed"] == 8 << 20
    r = vm.qmp("block-job-set-speed", device="drive0", speed=-1)
    assert err(r)["desc"] == "Parameter 'speed' expects a non-negative value", r
    r = vm.qmp("block-job-set-speed", device="nope", speed=0)
    assert err(r) == {"class": "DeviceNotActive", "desc": "Block job 'nope' not found"}, r
    vm.cmd("block-job-set-speed", device="drive0", speed=0)
    ev = vm.wait_until_completed()
    assert ev["speed"] == 0, ev
    vm.close("drive0")
    compare_raw(paths[-1], ref)


def case_manual_finalize(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    vm.cmd("block-stream", device="drive0", job_id="j", auto_finalize=False, auto_dismiss=False)
    ev = vm.event_wait("BLOCK_JOB_PENDING", 60)
    assert ev["data"] == {"type": "stream", "id": "j"}, ev
    assert vm.job("j")["status"] == "pending"
    r = vm.qmp("job-dismiss", id="j")
    assert err(r)["desc"] == "Job 'j' in state 'pending' cannot accept command verb 'dismiss'", r
    # Not finalized yet: the backing file is still there.
    assert vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2
    vm.cmd("job-finalize", id="j")
    vm.wait_until_completed(drive="j")
    jobs = vm.cmd("query-jobs")
    assert jobs[0]["id"] == "j" and jobs[0]["status"] == "concluded", jobs
    vm.cmd("job-dismiss", id="j")
    assert vm.cmd("query-jobs") == []
    r = vm.qmp("job-dismiss", id="j")
    assert err(r)["desc"] == "Job not found", r
    vm.close("drive0")
    compare_raw(paths[-1], ref)


run_case(globals())

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
    if not ("error" in r):
        raise AssertionError(r)
    return r["error"]


def case_stream(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2')
    vm.cmd("block-stream", device="drive0")
    ev = vm.wait_until_completed()
    if not (ev["len"] == 32 << 20 and ev["speed"] == 0):
        raise AssertionError(ev)
    vm.assert_no_active_block_jobs()
    ins = vm.cmd("query-block")[0]["inserted"]
    if not (ins["backing_file_depth"] == 0 and "backing_file" not in ins):
        raise AssertionError(ins)
    statuses = vm.statuses("drive0")
    if not (statuses == ["created", "running", "waiting", "pending", "concluded", "null"]):
        raise AssertionError(statuses)
    vm.close("drive0")
    if not ("backing-filename" not in info(paths[-1])):
        raise AssertionError('failed: "backing-filename" not in info(paths[-1])')
    check(paths[-1])
    compare_raw(paths[-1], ref)
    # The zero range of mid (over base data) did not become data in top.
    m = [e for e in qmap(paths[-1]) if e["start"] <= 17 << 20 < e["start"] + e["length"]][0]
    if not (m["zero"] and not m["data"]):
        raise AssertionError(m)


def case_intermediate(vm, d):
    paths, ref = chain_nodes(vm, d)
    vm.cmd("block-stream", device="mid", job_id="stream-mid")
    vm.wait_until_completed(drive="stream-mid")
    vm.assert_no_active_block_jobs()
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1')
    vm.close("drive0")
    if not ("backing-filename" not in info(paths[1])):
        raise AssertionError('failed: "backing-filename" not in info(paths[1])')
    if not (info(paths[2])["backing-filename"] == paths[1]):
        raise AssertionError('failed: info(paths[2])["backing-filename"] == paths[1]')
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
    if not (j["status"] == "paused"):
        raise AssertionError(j)
    offset = j["offset"]
    time.sleep(0.5)
    j = vm.job("drive0")
    if not (j["offset"] == offset and j["paused"]):
        raise AssertionError((offset, j))
    r = vm.qmp("block-job-pause", device="drive0")
    if not (err(r)["desc"] == "Job is already paused"):
        raise AssertionError(r)
    vm.cmd("block-job-resume", device="drive0")
    vm.cmd("block-job-set-speed", device="drive0", speed=0)
    vm.wait_until_completed()
    statuses = vm.statuses("drive0")
    if not ("paused" in statuses and statuses[-1] == "null"):
        raise AssertionError(statuses)
    vm.close("drive0")
    compare_raw(paths[-1], ref)
    check(paths[-1])


def case_noop(vm, d):
    paths, ref = chain_nodes(vm, d)
    before = qmap(paths[-1])
    vm.cmd("block-stream", device="drive0", base_node="mid")
    ev = vm.wait_until_completed()
    if not (ev["len"] == ev["offset"]):
        raise AssertionError(ev)
    vm.close("drive0")
    if not (qmap(paths[-1]) == before):
        raise AssertionError('failed: qmap(paths[-1]) == before')
    if not (info(paths[-1])["backing-filename"] == paths[1]):
        raise AssertionError('failed: info(paths[-1])["backing-filename"] == paths[1]')
    compare_raw(paths[-1], ref)


def case_partial(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    vm.cmd("block-stream", device="drive0", base=paths[0])
    vm.wait_until_completed()
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 1')
    vm.close("drive0")
    i = info(paths[-1])
    if not (i["backing-filename"] == paths[0]):
        raise AssertionError(i)  # the base's file name as opened (absolute)
    check(paths[-1])
    compare_raw(paths[-1], ref)
    if not (depth_at(paths[-1], 0) == 1):
        raise AssertionError(qmap(paths[-1]))  # base-only data stays in base
    if not (depth_at(paths[-1], 2 << 20) == 0):
        raise AssertionError(qmap(paths[-1]))  # mid's data was copied


def case_backing_file(vm, d):
    paths, ref = chain_nodes(vm, d)
    r = vm.qmp("block-stream", device="drive0", backing_file="base.qcow2")
    if not (err(r)["desc"] == "backing file specified, but streaming the entire chain"):
        raise AssertionError(r)
    vm.cmd("block-stream", device="drive0", base_node="base", backing_file="base.qcow2")
    vm.wait_until_completed()
    vm.close("drive0")
    if not (info(paths[-1])["backing-filename"] == "base.qcow2"):
        raise AssertionError('failed: info(paths[-1])["backing-filename"] == "base.qcow2"')
    compare_raw(paths[-1], ref)


def case_device_not_found(vm, d):
    r = vm.qmp("block-stream", device="nonexistent")
    e = err(r)
    if not (e["class"] == "GenericError"):
        raise AssertionError(e)
    if not (e["desc"] == "Cannot find device='nonexistent' nor node-name='nonexistent'"):
        raise AssertionError(e)


def case_job_id_missing(vm, d):
    chain_nodes(vm, d)
    r = vm.qmp("block-stream", device="mid")
    if not (err(r)["desc"] == "Invalid job ID ''"):
        raise AssertionError(r)
    vm.assert_no_active_block_jobs()


def case_read_only(vm, d):
    paths, _ = chain_nodes(vm, d)
    ro = os.path.join(d, "ro-top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", ro, SIZE)
    vm.open(node_name="ro-top", filename=ro, backing="mid", read_only=True)
    r = vm.qmp("block-stream", job_id="stream", device="ro-top", base_node="base")
    if not (err(r)["desc"] == "Block node is read-only"):
        raise AssertionError(r)


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
    if not (sorted(j["device"] for j in vm.jobs()) == sorted(jobs)):
        raise AssertionError('failed: sorted(j["device"] for j in vm.jobs()) == sorted(jobs)')
    for jid in reversed(jobs):
        vm.cmd("block-job-set-speed", device=jid, speed=0)
    for jid in jobs:
        vm.wait_until_completed(drive=jid)
    vm.assert_no_active_block_jobs()
    vm.close("drive0")
    for i in range(2, 9, 2):
        if not (info(paths[i])["backing-filename"] == paths[i - 2]):
            raise AssertionError(info(paths[i]))
        check(paths[i])
        compare_raw(paths[i], reference(d, paths[i], f"n{i}.raw"))
    compare_raw(paths[-1], ref)


def case_overlapping(vm, d):
    paths, ref = nine(vm, d)
    vm.cmd("block-stream", device="node4", job_id="stream-node4", base=paths[1], speed=1 << 20)
    busy = "Node '{}' is busy: block device is in use by block job: stream"
    r = vm.qmp("block-stream", device="node5", job_id="stream-node5", base=paths[2])
    if not (err(r)["desc"] == busy.format("node4")):
        raise AssertionError(r)
    r = vm.qmp("block-stream", device="node3", job_id="stream-node3", base=paths[2])
    if not (err(r)["desc"] == busy.format("node3")):
        raise AssertionError(r)
    r = vm.qmp("block-stream", device="node4", job_id="stream-node4-v2")
    if not (err(r)["desc"] == busy.format("node4")):
        raise AssertionError(r)
    r = vm.qmp("block-stream", device="node6", job_id="stream-node4", base_node="node5")
    if not (err(r)["desc"] == "Job ID 'stream-node4' already in use"):
        raise AssertionError(r)
    # Above the job's nodes is free.
    vm.cmd("block-stream", device="node6", job_id="stream-node6", base_node="node4")
    vm.wait_until_completed(drive="stream-node6")
    vm.cmd("block-job-cancel", device="stream-node4")
    ev = vm.event_wait("BLOCK_JOB_CANCELLED", 30, {"device": "stream-node4"})
    if not (ev["data"]["offset"] <= ev["data"]["len"]):
        raise AssertionError(ev)
    vm.assert_no_active_block_jobs()
    vm.close("drive0")
    compare_raw(paths[-1], ref)
    if not (info(paths[4])["backing-filename"] == paths[3]):
        raise AssertionError('failed: info(paths[4])["backing-filename"] == paths[3]')


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
        if not (err(r)["desc"] == want):
            raise AssertionError((kw, r))
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
    if not ("backing-filename" not in info(top)):
        raise AssertionError('failed: "backing-filename" not in info(top)')
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
    if not (ev["data"] == {"device": "drive0", "operation": "read", "action": "report"}):
        raise AssertionError(ev)
    c = vm.wait_until_completed(error="Input/output error")
    if not (c["offset"] < c["len"]):
        raise AssertionError(c)
    vm.assert_no_active_block_jobs()
    vm.close("drive0")
    if not (info(paths[-1])["backing-filename"] == paths[1]):
        raise AssertionError('failed: info(paths[-1])["backing-filename"] == paths[1]')
    compare_raw(paths[-1], ref)
    check(paths[-1])


def case_on_error_ignore(vm, d):
    paths, ref = error_chain(vm, d, "failure", "ignore")
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    if not (ev["data"]["action"] == "ignore"):
        raise AssertionError(ev)
    c = vm.wait_until_completed(error="Input/output error")
    if not (c["offset"] == c["len"]):
        raise AssertionError(c)
    vm.close("drive0")
    if not (info(paths[-1])["backing-filename"] == paths[1]):
        raise AssertionError('failed: info(paths[-1])["backing-filename"] == paths[1]')
    compare_raw(paths[-1], ref)


def stop_then_resume(vm, paths, ref, io_status):
    ev = vm.event_wait("BLOCK_JOB_ERROR", 30)
    if not (ev["data"]["action"] == "stop"):
        raise AssertionError(ev)
    j = vm.pause_wait("drive0")
    if not (j["status"] == "paused" and j["io-status"] == io_status):
        raise AssertionError(j)
    vm.cmd("block-job-resume", device="drive0")
    if not (vm.job("drive0")["io-status"] == "ok"):
        raise AssertionError('failed: vm.job("drive0")["io-status"] == "ok"')
    vm.wait_until_completed()
    vm.close("drive0")
    if not ("backing-filename" not in info(paths[-1])):
        raise AssertionError('failed: "backing-filename" not in info(paths[-1])')
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
    if not (ev["data"]["action"] == "report"):
        raise AssertionError(ev)
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
    if not (err(r)["desc"] == "The block job for device 'drive0' is currently paused"):
        raise AssertionError(r)
    vm.cmd("block-job-cancel", device="drive0", force=True)
    ev = vm.event_wait("BLOCK_JOB_CANCELLED", 30, {"device": "drive0"})
    if not (ev["data"]["type"] == "stream"):
        raise AssertionError(ev)
    vm.assert_no_active_block_jobs()
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2')
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
    if not (err(r)["desc"] == "Parameter 'speed' expects a non-negative value"):
        raise AssertionError(r)
    vm.assert_no_active_block_jobs()
    vm.cmd("block-stream", device="drive0", speed=1 << 20)
    if not (vm.job("drive0")["speed"] == 1 << 20):
        raise AssertionError('failed: vm.job("drive0")["speed"] == 1 << 20')
    vm.cmd("block-job-set-speed", device="drive0", speed=8 << 20)
    if not (vm.job("drive0")["speed"] == 8 << 20):
        raise AssertionError('failed: vm.job("drive0")["speed"] == 8 << 20')
    r = vm.qmp("block-job-set-speed", device="drive0", speed=-1)
    if not (err(r)["desc"] == "Parameter 'speed' expects a non-negative value"):
        raise AssertionError(r)
    r = vm.qmp("block-job-set-speed", device="nope", speed=0)
    if not (err(r) == {"class": "DeviceNotActive", "desc": "Block job 'nope' not found"}):
        raise AssertionError(r)
    vm.cmd("block-job-set-speed", device="drive0", speed=0)
    ev = vm.wait_until_completed()
    if not (ev["speed"] == 0):
        raise AssertionError(ev)
    vm.close("drive0")
    compare_raw(paths[-1], ref)


def case_manual_finalize(vm, d):
    paths, ref = chain3(d)
    vm.open(name="drive0", node_name="top", filename=paths[-1])
    vm.cmd("block-stream", device="drive0", job_id="j", auto_finalize=False, auto_dismiss=False)
    ev = vm.event_wait("BLOCK_JOB_PENDING", 60)
    if not (ev["data"] == {"type": "stream", "id": "j"}):
        raise AssertionError(ev)
    if not (vm.job("j")["status"] == "pending"):
        raise AssertionError('failed: vm.job("j")["status"] == "pending"')
    r = vm.qmp("job-dismiss", id="j")
    if not (err(r)["desc"] == "Job 'j' in state 'pending' cannot accept command verb 'dismiss'"):
        raise AssertionError(r)
    # Not finalized yet: the backing file is still there.
    if not (vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2):
        raise AssertionError('failed: vm.cmd("query-block")[0]["inserted"]["backing_file_depth"] == 2')
    vm.cmd("job-finalize", id="j")
    vm.wait_until_completed(drive="j")
    jobs = vm.cmd("query-jobs")
    if not (jobs[0]["id"] == "j" and jobs[0]["status"] == "concluded"):
        raise AssertionError(jobs)
    vm.cmd("job-dismiss", id="j")
    if not (vm.cmd("query-jobs") == []):
        raise AssertionError('failed: vm.cmd("query-jobs") == []')
    r = vm.qmp("job-dismiss", id="j")
    if not (err(r)["desc"] == "Job not found"):
        raise AssertionError(r)
    vm.close("drive0")
    compare_raw(paths[-1], ref)


run_case(globals())

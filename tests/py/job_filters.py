"""The filter nodes of block jobs (`filter-node-name`), compared step by step
with qemu-storage-daemon 10 running the same conversation: block-stream's
copy-on-read node, an intermediate block-commit's commit_top node, an active
commit's and blockdev-mirror's mirror_top node. While the job runs the named
node is listed by query-named-block-nodes (flat and not) with its driver, its
file and the image below it, its name is taken (blockdev-add refused) and
blockdev-del of it refused; once the job is gone so is the node. Refused
names (taken, ill-formed, too long) in QEMU's words and events."""

import os
import time

import qmp_script

from stream_common import make_chain, qsd_monitor, run_case

FILTERS = {"cor", "cf", "af", "mf", "cor2"}
MINE = {"base", "mid", "top", "tgt"} | FILTERS


def node_view(n):
    """What a client sees of a filter node; the image nodes by name only."""
    if n["node-name"] not in FILTERS:
        return (n["node-name"],)
    img = n["image"]
    below = img.get("backing-image", {})
    return (n["node-name"], n["drv"], n["ro"], n["file"], n["backing_file_depth"], img["format"],
            img["filename"], img["virtual-size"], img.get("cluster-size"), below.get("filename"),
            below.get("format"))


def answer(cmd, r):
    if "error" in r:
        return ("error", r["error"]["class"], r["error"]["desc"])
    v = r["return"]
    if cmd == "query-named-block-nodes":
        return sorted(node_view(n) for n in v if n["node-name"] in MINE)
    if cmd == "query-block-jobs":
        return [(j["device"], j["type"]) for j in v]
    return ("ok", v)


def event_view(ev):
    data = {k: v for k, v in ev["data"].items() if k not in ("offset", "len")}
    return (ev["event"], data)


def job_events(events):
    """The events without what is not about filters: QEMU's drain around a
    graph change (the refused blockdev-add / blockdev-del) pauses and
    resumes running jobs, and sluice's active commit at speed 1 reports
    ready where QEMU's is still copying (both seen before filters existed)."""
    out, after_pause = [], False
    for name, data in events:
        status = data.get("status")
        if status == "paused" or (after_pause and status == "running"):
            after_pause = status == "paused"
            continue
        after_pause = False
        if status == "ready" or name == "BLOCK_JOB_READY":
            continue
        out.append((name, data))
    return out


def slow(cmd, **kw):
    return (cmd, {"speed": 1, **kw})


def script(d):
    f = lambda p: {"driver": "file", "filename": os.path.join(d, p)}  # noqa: E731
    s = [
        ("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": f("base.qcow2"), "backing": None}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "mid", "file": f("mid.qcow2"), "backing": "base"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": f("top.qcow2"), "backing": "mid"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": f("tgt.qcow2")}),
    ]
    # Names no filter may take, for each job type.
    for bad in ("mid", "1bad", "x" * 32):
        s += [
            slow("block-stream", **{"device": "top", "job-id": "s", "filter-node-name": bad}),
            slow("block-commit", **{"device": "top", "job-id": "c", "top-node": "mid", "filter-node-name": bad}),
            slow("block-commit", **{"device": "top", "job-id": "a", "filter-node-name": bad}),
            slow("blockdev-mirror", **{"device": "top", "job-id": "m", "target": "tgt", "sync": "full",
                                       "filter-node-name": bad}),
        ]
    s += [("query-jobs", {})]
    # Each filter while its job runs, then gone with the job.
    jobs = [
        ("s1", "cor", slow("block-stream", **{"device": "top", "job-id": "s1", "filter-node-name": "cor"})),
        ("c1", "cf", slow("block-commit", **{"device": "top", "job-id": "c1", "top-node": "mid",
                                             "filter-node-name": "cf"})),
        ("a1", "af", slow("block-commit", **{"device": "top", "job-id": "a1", "filter-node-name": "af"})),
        ("m1", "mf", slow("blockdev-mirror", **{"device": "top", "job-id": "m1", "target": "tgt",
                                                "sync": "full", "filter-node-name": "mf"})),
    ]
    for jid, name, start in jobs:
        s += [
            start,
            ("query-block-jobs", {}),
            ("query-named-block-nodes", {"flat": True}),
            ("query-named-block-nodes", {}),
            ("blockdev-add", {"driver": "null-co", "node-name": name}),
            ("blockdev-del", {"node-name": name}),
            # force: a cancel of a ready job (sluice's active commit, see
            # job_events) would complete it instead.
            ("block-job-cancel", {"device": jid, "force": True}),
            ("wait", jid),
            ("sleep", 0.3),
            ("query-named-block-nodes", {"flat": True}),
        ]
    # A stream to its end: the node goes with the job, the name is free again.
    s += [
        ("block-stream", {"device": "top", "job-id": "s2", "filter-node-name": "cor2"}),
        ("wait", "s2"),
        ("sleep", 0.3),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-add", {"driver": "null-co", "node-name": "cor2"}),
        ("blockdev-del", {"node-name": "cor2"}),
    ]
    return s


def run(vm, d, steps):
    """qmp_script's run, with ("sleep", s): QEMU drops a job's filter a
    moment after the job's last event."""
    out = []
    for step in steps:
        if step[0] == "sleep":
            time.sleep(step[1])
            continue
        out += qmp_script.run_script(vm, d, [step], answer, event_view)
    return [(k, a, job_events(r)) if k == "events" else (k, a, r) for k, a, r in out]


def make(d):
    os.makedirs(d, exist_ok=True)
    make_chain(d, ["base", "mid", "top"], "4M", [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 0 1M"],
        ["write -P 0x33 1M 1M"],
    ])
    make_chain(d, ["tgt"], "4M", [[]])


def case_filters(vm, d):
    want_d = os.path.join(d, "qsd")
    make(want_d)
    with qsd_monitor(want_d) as qsd:
        want = run(qsd, want_d, script(want_d))
    make(d)
    got = run(vm, d, script(d))
    wrong = [f"step {i}:\nsluice {g}\nqsd    {w}" for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if wrong or len(got) != len(want):
        raise AssertionError("\n".join(wrong) + f"\n({len(got)} steps against {len(want)})")
    # The conversation had each filter listed while its job ran.
    listed = {n[0] for step in got if step[0] == "query-named-block-nodes" for n in step[2]}
    if not (FILTERS - {"cor2"} <= listed):
        raise AssertionError(f"filters listed: {listed}")


run_case(globals())

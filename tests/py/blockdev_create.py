"""blockdev-create the qemu-storage-daemon / libvirt way, through qemu.qmp:
an overlay made over QMP alone (file, then qcow2 onto the file node), added
and snapshotted onto an exported node; the create job's events and
query-jobs output, and every refusal, compared with qemu-storage-daemon 10."""

import os
import subprocess
import time

from stream_common import (run_case, qsd_monitor, check, compare_raw, depth_at, info, make_chain,
                           qmap, qemu_img, qemu_io, reference)

MiB = 1 << 20


def nodes(vm):
    return {n["node-name"]: n for n in vm.cmd("query-named-block-nodes")}


def uri(sock, name):
    return f"nbd+unix:///{name}?socket={sock}"


def job_statuses(vm, jid):
    """Waits for the job to conclude; returns its JOB_STATUS_CHANGE statuses."""
    vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": jid, "status": "concluded"})
    got = [e["data"]["status"] for e in vm.pending
           if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == jid]
    vm.pending = [e for e in vm.pending
                  if not (e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == jid)]
    return got + ["concluded"]


def create(vm, jid, options):
    """blockdev-create, wait for concluded, dismiss; returns (statuses, query-jobs)."""
    vm.cmd("blockdev-create", job_id=jid, options=options)
    st = job_statuses(vm, jid)
    jobs = vm.cmd("query-jobs")
    vm.cmd("job-dismiss", id=jid)
    vm.event_wait("JOB_STATUS_CHANGE", 10, {"id": jid, "status": "null"})
    if not (vm.cmd("query-jobs") == []):
        raise AssertionError(vm.cmd("query-jobs"))
    return st, jobs


OK_STATUSES = ["created", "running", "waiting", "pending", "concluded"]


def case_flow(vm, d):
    """libvirt's overlay over QMP alone: blockdev-create a file, add it,
    blockdev-create qcow2 onto it with top as backing, add it with backing:
    null, blockdev-snapshot the exported top onto it; writes land in ov."""
    paths = make_chain(d, ["base", "top"], "8M", [
        ["write -P 0x11 0 4M"],
        ["write -P 0x22 1M 2M"],
    ])
    top = paths[-1]
    ref = reference(d, top)
    vm.cmd("blockdev-add", driver="qcow2", node_name="top",
           file={"driver": "file", "filename": top})
    sock = os.path.join(d, "nbd.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    vm.cmd("block-export-add", type="nbd", id="e0", node_name="top", writable=True)
    for img in (uri(sock, "top"), ref):
        qemu_io("-f", "raw", "-c", "write -P 0x44 3M 64k", img)

    ov = os.path.join(d, "ov.qcow2")
    st, jobs = create(vm, "c1", {"driver": "file", "filename": ov, "size": 0})
    if not (st == OK_STATUSES):
        raise AssertionError(st)
    if not (jobs == [{"id": "c1", "type": "create", "status": "concluded",
                     "current-progress": 1, "total-progress": 1}]):
        raise AssertionError(jobs)
    if not (os.path.getsize(ov) == 0):
        raise AssertionError('failed: os.path.getsize(ov) == 0')
    vm.cmd("blockdev-add", driver="file", node_name="ov-file", filename=ov)
    size = nodes(vm)["top"]["image"]["virtual-size"]
    if not (size == 8 * MiB):
        raise AssertionError(size)
    st, jobs = create(vm, "c2", {"driver": "qcow2", "file": "ov-file", "size": size,
                                 "backing-file": top, "backing-fmt": "qcow2"})
    if not (st == OK_STATUSES):
        raise AssertionError(st)
    if not ("error" not in jobs[0] and jobs[0]["type"] == "create"):
        raise AssertionError(jobs)
    # Written through the file node, which sees the image's length.
    if not (nodes(vm)["ov-file"]["image"]["virtual-size"] == os.path.getsize(ov) > 0):
        raise AssertionError('failed: nodes(vm)["ov-file"]["image"]["virtual-size"] == os.path.getsize(ov) > 0')
    i = info(ov)
    if not (i["format"] == "qcow2" and i["virtual-size"] == size):
        raise AssertionError(i)
    if not (i["backing-filename"] == top and i["backing-filename-format"] == "qcow2"):
        raise AssertionError(i)
    vm.cmd("blockdev-add", driver="qcow2", node_name="ov", file="ov-file", backing=None)
    vm.cmd("blockdev-snapshot", node="top", overlay="ov")
    ex = vm.cmd("query-block-exports")
    if not (ex == [{"type": "nbd", "id": "e0", "node-name": "ov", "shutting-down": False}]):
        raise AssertionError(ex)
    for img in (uri(sock, "top"), ref):
        qemu_io("-f", "raw", "-c", "write -P 0x66 7M 64k", "-c", "write -P 0x77 0 64k", img)
    if not (nodes(vm)["ov"]["backing_file_depth"] == 2):
        raise AssertionError(nodes(vm)["ov"])
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock, "top"), ref],
                       capture_output=True, text=True)
    if not (r.returncode == 0):
        raise AssertionError(r.stdout + r.stderr)
    vm.cmd("block-export-del", id="e0")
    vm.event_wait("BLOCK_EXPORT_DELETED", 10, {"id": "e0"})
    vm.cmd("blockdev-del", node_name="ov")
    vm.cmd("blockdev-del", node_name="top")
    if not (set(nodes(vm)) == {"ov-file"}):
        raise AssertionError(nodes(vm))
    vm.cmd("blockdev-del", node_name="ov-file")
    if not (nodes(vm) == {}):
        raise AssertionError(nodes(vm))
    for p in (ov, top):
        check(p)
    i = info(ov)
    if not (i["backing-filename"] == top and i["backing-filename-format"] == "qcow2"):
        raise AssertionError(i)
    compare_raw(ov, ref)
    # Written after the switch: in ov; the old top does not have it.
    if not (depth_at(ov, 7 * MiB) == 0 and depth_at(ov, 0) == 0):
        raise AssertionError(qmap(ov))
    if not (depth_at(ov, 1 * MiB) == 1):
        raise AssertionError(qmap(ov))
    if not (depth_at(top, 7 * MiB) != 0):
        raise AssertionError(qmap(top))
    qemu_io("-r", "-c", "read -P 0x77 0 64k", "-c", "read -P 0x11 64k 64k",
            "-c", "read -P 0x22 1M 64k", "-c", "read -P 0x66 7M 64k", ov)


# --- compared with qemu-storage-daemon ---------------------------------------

def run_script(vm, script, d):
    """Runs (command, arguments) pairs; ("job", id) waits for the job to
    conclude and records its statuses and query-jobs, then dismisses it;
    ("concluded", id) only waits for the job to conclude.
    Answers have the directory replaced by D."""
    out = []

    def norm(v):
        if isinstance(v, str):
            return v.replace(d, "D")
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v

    for cmd, args in script:
        if cmd == "concluded":
            # Waits without taking the event (its "job" step reads it).
            vm.pending.append(vm.event_wait("JOB_STATUS_CHANGE", 20,
                                            {"id": args, "status": "concluded"}))
            continue
        if cmd == "job":
            st = job_statuses(vm, args)
            jobs = vm.rcmd("query-jobs")
            blk = vm.rcmd("query-block-jobs")
            vm.rcmd("job-dismiss", {"id": args})
            vm.event_wait("JOB_STATUS_CHANGE", 10, {"id": args, "status": "null"})
            out.append(("job", args, norm([st, jobs, blk])))
            continue
        r = vm.raw(cmd, args)
        if "error" in r:
            out.append((cmd, norm(args), norm(r["error"])))
        elif cmd.startswith("query-"):
            out.append((cmd, norm(args), norm(r["return"])))
        else:
            out.append((cmd, norm(args), "ok"))
    return out


def qsd_answers(d, script):
    with qsd_monitor(d) as qsd:
        return run_script(qsd, script, d)


def compare(vm, d, script_of):
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        os.mkdir(sub)
        make_chain(sub, ["base", "top"], "8M", [["write -P 0x11 0 1M"], []])
        script = script_of(sub)
        runs[who] = qsd_answers(sub, script) if who == "qsd" else run_script(vm, script, sub)
        check(os.path.join(sub, "top.qcow2"))
    for g, w in zip(runs["sluice"], runs["qsd"]):
        if not (g == w):
            raise AssertionError(f"\nsluice: {g}\nqsd:    {w}")
    if not (len(runs["sluice"]) == len(runs["qsd"])):
        raise AssertionError('failed: len(runs["sluice"]) == len(runs["qsd"])')
    return runs["sluice"], [os.path.join(d, w) for w in ("qsd", "sluice")]


def jobs_script(d):
    """The libvirt flow's create jobs, with their events and query-jobs."""
    ov, top = os.path.join(d, "ov.qcow2"), os.path.join(d, "top.qcow2")
    # A nested file reference opens an existing file.
    open(os.path.join(d, "v2.qcow2"), "w").close()
    return [
        ("blockdev-create", {"job-id": "c1", "options": {"driver": "file", "filename": ov,
                                                         "size": 0}}),
        ("query-block-jobs", {}),
        ("job", "c1"),
        ("blockdev-add", {"driver": "file", "node-name": "ov-file", "filename": ov}),
        ("blockdev-create", {"job-id": "c2", "options": {
            "driver": "qcow2", "file": "ov-file", "size": 8 * MiB, "backing-file": top,
            "backing-fmt": "qcow2", "cluster-size": 65536, "version": "v3", "refcount-bits": 16,
            "lazy-refcounts": False, "preallocation": "off"}}),
        ("job", "c2"),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": "ov-file",
                          "backing": None}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-snapshot", {"node": "top", "overlay": "ov"}),
        # A concluded create job refuses what concluded jobs refuse; it is no block job.
        ("blockdev-create", {"job-id": "c3", "options": {
            "driver": "qcow2", "file": {"driver": "file", "filename": os.path.join(d, "v2.qcow2")},
            "size": MiB, "version": "v2", "cluster-size": 4096}}),
        ("job", "c3"),
        ("blockdev-create", {"job-id": "c4", "options": {"driver": "file",
                                                         "filename": os.path.join(d, "f"),
                                                         "size": 1000, "nocow": True}}),
        ("concluded", "c4"),
        ("job-finalize", {"id": "c4"}),
        ("job-cancel", {"id": "c4"}),
        ("job-pause", {"id": "c4"}),
        ("block-job-cancel", {"device": "c4"}),
        ("query-block-jobs", {}),
        ("job", "c4"),
        ("blockdev-del", {"node-name": "ov"}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "ov-file"}),
        ("query-named-block-nodes", {}),
    ]


def case_jobs_qsd(vm, d):
    got, dirs = compare(vm, d, jobs_script)
    if not ([g[2][0] for g in got if g[0] == "job"] == [OK_STATUSES] * 4):
        raise AssertionError(got)
    for sub in dirs:
        ov = os.path.join(sub, "ov.qcow2")
        check(ov)
        i = info(ov)
        if not (i["backing-filename"] == os.path.join(sub, "top.qcow2")):
            raise AssertionError(i)
        i = info(os.path.join(sub, "v2.qcow2"))
        if not (i["format-specific"]["data"]["compat"] == "0.10" and i["cluster-size"] == 4096):
            raise AssertionError(i)
        check(os.path.join(sub, "v2.qcow2"))
        if not (os.path.getsize(os.path.join(sub, "f")) == 1000):
            raise AssertionError('failed: os.path.getsize(os.path.join(sub, "f")) == 1000')


def errors_script(d):
    """Refusals: of the command (QAPI) and of the job (concluded with an error)."""
    ov, top = os.path.join(d, "ov.qcow2"), os.path.join(d, "top.qcow2")
    f = lambda **kw: {"driver": "file", "filename": os.path.join(d, "x"), "size": 0, **kw}  # noqa: E731
    q = lambda **kw: {"driver": "qcow2", "file": "ov-file", "size": MiB, **kw}  # noqa: E731
    n = 0

    def job(options):
        nonlocal n
        n += 1
        return [("blockdev-create", {"job-id": f"e{n}", "options": options}), ("job", f"e{n}")]

    open(ov, "w").close()
    script = [
        ("blockdev-create", {"options": f()}),
        ("blockdev-create", {"job-id": "x"}),
        ("blockdev-create", {"job-id": 5, "options": f()}),
        ("blockdev-create", {"job-id": "x", "options": {"filename": ov, "size": 0}}),
        ("blockdev-create", {"job-id": "x", "options": {"driver": "nope"}}),
        ("blockdev-create", {"job-id": "x", "options": {"driver": "raw", "size": MiB}}),
        ("blockdev-create", {"job-id": "x", "options": {"driver": "raw"}}),
        ("blockdev-create", {"job-id": "x", "options": {"driver": "file", "filename": ov}}),
        ("blockdev-create", {"job-id": "x", "options": f(size="x")}),
        ("blockdev-create", {"job-id": "x", "options": f(preallocation="bogus")}),
        ("blockdev-create", {"job-id": "x", "options": f(bogus=1)}),
        ("blockdev-create", {"job-id": "x", "options": f(), "bogus": 1}),
        ("blockdev-create", {"job-id": "1bad", "options": f()}),
        ("blockdev-create", {"job-id": "x", "options": {"driver": "qcow2", "size": MiB}}),
        ("blockdev-create", {"job-id": "x", "options": {"driver": "qcow2", "file": "ov-file"}}),
        ("blockdev-create", {"job-id": "x", "options": q(version="v4")}),
        ("blockdev-create", {"job-id": "x", "options": q(file=5)}),
        ("blockdev-create", {"job-id": "d", "options": f()}),
        ("blockdev-create", {"job-id": "d", "options": f()}),
        ("job", "d"),
        ("blockdev-add", {"driver": "file", "node-name": "ov-file", "filename": ov}),
        ("blockdev-add", {"driver": "file", "node-name": "ro", "filename": top, "read-only": True}),
    ]
    fail = []
    for o in [f(filename="/nonexistent/x"), q(file="nosuch"), q(size=1000),
              q(**{"cluster-size": 1000}), q(**{"cluster-size": 256}),
              q(**{"cluster-size": 4 * MiB}), q(**{"extended-l2": True, "cluster-size": 4096}),
              q(**{"refcount-bits": 3}), q(version="v2", **{"refcount-bits": 8}),
              q(version="v2", **{"lazy-refcounts": True}),
              q(version="v2", **{"compression-type": "zstd"}), q(**{"backing-fmt": "qcow2"}),
              q(**{"backing-file": top, "preallocation": "metadata"}),
              q(file={"driver": "file", "filename": os.path.join(d, "missing")}),
              q(file="ro")]:
        fail += job(o)
    # A valid image first, then added: writing onto its file is refused.
    busy = job(q()) + [
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": "ov-file", "backing": None}),
    ] + job(q()) + job(f(filename=ov))
    end = [
        ("blockdev-del", {"node-name": "ov"}),
        ("blockdev-del", {"node-name": "ov-file"}),
        ("blockdev-del", {"node-name": "ro"}),
        ("query-named-block-nodes", {}),
    ]
    return script + fail + busy + end


def case_errors_qsd(vm, d):
    got, _ = compare(vm, d, errors_script)
    refused = [g for g in got if isinstance(g[2], dict)]
    failed = [g for g in got if g[0] == "job" and "error" in g[2][1][0]]
    if not (len(refused) == 18 and len(failed) == 17):
        raise AssertionError((len(refused), len(failed)))
    # A failed job goes running -> aborting -> concluded.
    for g in failed:
        if not (g[2][0] == ["created", "running", "aborting", "concluded"]):
            raise AssertionError(g)


run_case(globals())

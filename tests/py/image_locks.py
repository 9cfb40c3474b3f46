"""Image locks over QMP, compared with qemu-storage-daemon 10 answering the
same commands: a snapshot onto the node's own image, `blockdev-create` of a
file an image node has open, a second writer and a reader of that file; the
image is intact afterwards (qemu-img check, qemu-io pattern reads)."""

import os
import subprocess

from stream_common import run_case, qsd_monitor, make_chain

MiB = 1 << 20


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def run(*cmd):
    """Runs a QEMU tool, bounded in time (`qemu-img check` of an image made
    its own backing file never ends); raises unless it succeeds."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or "verification failed" in r.stdout:
        raise Mismatch(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")


def answers(vm, d, script):
    """Runs (command, arguments) pairs; ("job", id) waits for the job to
    conclude and records its error, then dismisses it. Errors are reduced to
    QEMU's message before sluice's hint, the directory replaced by D."""
    out = []
    for cmd, args in script:
        if cmd == "job":
            vm.event_wait("JOB_STATUS_CHANGE", 20, {"id": args, "status": "concluded"})
            jobs = [j for j in vm.rcmd("query-jobs") if j["id"] == args]
            out.append(("job", jobs[0].get("error")))
            vm.rcmd("job-dismiss", {"id": args})
            continue
        r = vm.raw(cmd, args)
        if "error" in r:
            desc = r["error"]["desc"].split(". Is another process")[0]
            out.append((cmd, "error", r["error"]["class"], desc.replace(d, "D")))
        else:
            out.append((cmd, "ok"))
    return out


def script(d):
    top = os.path.join(d, "top.qcow2")
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-snapshot-sync", {"node-name": "top", "snapshot-file": top,
                                    "snapshot-node-name": "s0", "format": "qcow2"}),
        ("blockdev-create", {"job-id": "c1", "options": {"driver": "file", "filename": top,
                                                         "size": 0}}),
        ("job", "c1"),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top2",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top3", "read-only": True,
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-del", {"node-name": "top"}),
        # Closed: the file is free again.
        ("blockdev-add", {"driver": "qcow2", "node-name": "top4",
                          "file": {"driver": "file", "filename": top}}),
        ("blockdev-del", {"node-name": "top4"}),
    ]


def case_locks_qsd(vm, d):
    runs = {}
    for who in ("qsd", "sluice"):
        sub = os.path.join(d, who)
        os.mkdir(sub)
        make_chain(sub, ["base", "top"], "8M", [["write -P 0x11 0 1M"], ["write -P 0x22 1M 1M"]])
        if who == "qsd":
            with qsd_monitor(sub) as qsd:
                runs[who] = answers(qsd, sub, script(sub))
        else:
            runs[who] = answers(vm, sub, script(sub))
        top = os.path.join(sub, "top.qcow2")
        run("qemu-img", "check", top)
        run("qemu-io", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", top)
    for g, w in zip(runs["sluice"], runs["qsd"]):
        expect(g == w, f"\nsluice: {g}\nqsd:    {w}")
    expect(len(runs["sluice"]) == len(runs["qsd"]), f"{runs}")
    refused = [a for a in runs["sluice"] if "error" in a or a[0] == "job"]
    expect(len(refused) == 4, f"expected 4 refusals: {runs['sluice']}")


run_case(globals())

"""Running one QMP conversation as a script, so that the same steps can be
run on qemu-storage-daemon and on sluice and the two transcripts compared
step by step (commit.py, mirror.py, libvirt_flows.py, qmp_surface.py).

A script is a list of (command, arguments). Three pseudo-commands wait
instead of sending: ("wait", job-id) waits for the job's JOB_STATUS_CHANGE
to null and records the job and block events that arrived until then;
("wait-status", (job-id, status)) waits for that status change; ("job",
job-id) waits for concluded, sends job-dismiss and records as "wait" does.
Replies pass through the caller's `answer(cmd, reply)` and events through
its `event_view(event)`, which drop what depends on timing; the scratch
directory becomes "D" everywhere (`scrub`)."""

import time


class Mismatch(Exception):
    pass


def scrub(v, d):
    """Directory-independent: the scratch directory becomes D."""
    if isinstance(v, str):
        return v.replace(d, "D")
    if isinstance(v, (list, tuple)):
        return type(v)(scrub(x, d) for x in v)
    if isinstance(v, dict):
        return {k: scrub(x, d) for k, x in v.items()}
    return v


def seen(vm, jid, status, timeout=60.0):
    """Waits until the job's status change to `status` arrived, leaving every
    event in `vm.pending` in arrival order."""
    deadline = time.time() + timeout
    while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": jid, "status": status}
                  for e in vm.pending):
        if time.time() >= deadline:
            raise Mismatch(f"{jid} never {status}: {vm.pending}")
        ev = vm.q.pull_event(wait=False)
        if ev is None:
            time.sleep(0.01)
        else:
            vm.pending.append(ev)


def job_events(vm, event_view):
    """The job and block events that arrived, as `event_view` shows them
    (sluice also tells QMP clients nothing else here; QEMU's other events
    are not compared), and forgets every pending event."""
    got = [event_view(e) for e in vm.pending if e["event"].startswith(("JOB_", "BLOCK_"))]
    vm.pending = []
    return got


def run_script(vm, d, steps, answer, event_view):
    out = []
    for cmd, args in steps:
        if cmd == "wait":
            seen(vm, args, "null")
            out.append(("events", args, job_events(vm, event_view)))
            continue
        if cmd == "wait-status":
            seen(vm, *args)
            continue
        if cmd == "job":
            # A job that waits for job-dismiss (blockdev-create's).
            seen(vm, args, "concluded")
            out.append(("job-dismiss", args, answer("job-dismiss", vm.raw("job-dismiss", {"id": args}))))
            seen(vm, args, "null")
            out.append(("events", args, job_events(vm, event_view)))
            continue
        out.append((cmd, scrub(args, d), scrub(answer(cmd, vm.raw(cmd, args)), d)))
    return out

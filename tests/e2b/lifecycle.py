"""Pause/resume, snapshots and forks through the unmodified `e2b` SDK (issue 5), including the
20-cycle pause/resume contract: each cycle writes a file, checks every earlier file and a
long-lived process, pauses (alternating memory and filesystem-only) and resumes.

Run by scripts/conformance.sh with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY set. The
`before`/`after` modes check that a paused sandbox survives a server restart.
"""

import sys
import time

import checks
from checks import check
from e2b import Sandbox
from e2b.exceptions import SandboxException


def frozen_process_keeps_running_state(s):
    """A background counter: after a memory pause it continues from where it was."""
    s.commands.run("sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done'",
                   background=True)
    time.sleep(0.5)


def contract(s):
    frozen_process_keeps_running_state(s)
    pid = s.commands.run("pgrep -f 'while true' | head -n1").stdout.strip()
    check("a long-lived process is running", pid.isdigit(), pid)
    for cycle in range(20):
        s.files.write(f"/home/user/cycle-{cycle}.txt", f"data {cycle}")
        memory = cycle % 2 == 0
        before = int(s.files.read("/tmp/counter").strip() or 0)
        s.pause(mode="full" if memory else "filesystem")
        state = s.get_info().state
        assert getattr(state, "value", state) == "paused", state
        if memory:
            time.sleep(0.3)
        s.connect()
        for c in range(cycle + 1):
            got = s.files.read(f"/home/user/cycle-{c}.txt")
            assert got == f"data {c}", (cycle, c, got)
        if memory:
            # The same process, resumed: its counter was frozen and now moves on.
            still = s.commands.run(f"kill -0 {pid} && echo alive").stdout.strip()
            assert still == "alive", (cycle, still)
            after = int(s.files.read("/tmp/counter").strip() or 0)
            assert after >= before, (cycle, before, after)
        else:
            # A filesystem-only pause ends processes: start the counter again.
            frozen_process_keeps_running_state(s)
            pid = s.commands.run("pgrep -f 'while true' | head -n1").stdout.strip()
    check("20 pause/resume cycles keep every file, and the process across memory pauses", True)


def snapshots():
    s = Sandbox.create()
    try:
        s.files.write("/home/user/base.txt", "from the snapshot")
        s.files.write("/home/user/gone.txt", "deleted later")
        snap = s.create_snapshot(name=f"snap-test-{int(time.time() * 1000)}")
        check("a snapshot is created", bool(snap.snapshot_id), snap)
        listed = [x.snapshot_id for x in s.list_snapshots().next_items()]
        check("snapshots are listed", snap.snapshot_id in listed, listed)
        t = Sandbox.create(template=snap.snapshot_id)
        try:
            check("a sandbox made from the snapshot has its files",
                  t.files.read("/home/user/base.txt") == "from the snapshot")
            # A deletion in a sandbox made from a snapshot is kept by the next snapshot (a
            # whiteout over the lower layer's file).
            t.files.remove("/home/user/gone.txt")
            snap2 = t.create_snapshot()
            u = Sandbox.create(template=snap2.snapshot_id)
            try:
                check("layers stack: a deleted file stays deleted in a snapshot of a snapshot",
                      not u.files.exists("/home/user/gone.txt")
                      and u.files.read("/home/user/base.txt") == "from the snapshot")
            finally:
                u.kill()
            try:
                Sandbox.delete_snapshot(snap.snapshot_id)
                check("a snapshot under another snapshot cannot be deleted", False, "deleted")
            except SandboxException as e:
                check("a snapshot under another snapshot cannot be deleted", "delete that first" in str(e) or "in use" in str(e), e)
            t.files.write("/home/user/base.txt", "changed in the copy")
            check("the snapshot's layer is shared read-only: the source is unchanged",
                  s.files.read("/home/user/base.txt") == "from the snapshot")
            try:
                Sandbox.delete_snapshot(snap.snapshot_id)
                check("deleting a snapshot in use is refused", False, "deleted")
            except SandboxException as e:
                check("deleting a snapshot in use is refused with a clear error", "in use" in str(e), e)
        finally:
            t.kill()
        check("the dependent snapshot is deleted", Sandbox.delete_snapshot(snap2.snapshot_id) is True)
        check("an unused snapshot is deleted", Sandbox.delete_snapshot(snap.snapshot_id) is True)
        check("deleting it again says not found", Sandbox.delete_snapshot(snap.snapshot_id) is False)
    finally:
        s.kill()


def forks():
    s = Sandbox.create()
    try:
        s.files.write("/home/user/parent.txt", "p")
        kids = s.fork(count=3)
        check("fork(count=3) makes three sandboxes", len(kids) == 3 and all(isinstance(k, Sandbox) for k in kids), kids)
        try:
            ids = {k.sandbox_id for k in kids} | {s.sandbox_id}
            check("each fork is its own sandbox", len(ids) == 4, ids)
            check("forks have the parent's files", all(k.files.read("/home/user/parent.txt") == "p" for k in kids))
            kids[0].files.write("/home/user/parent.txt", "changed")
            check("copy-on-write: a fork's change stays its own",
                  kids[1].files.read("/home/user/parent.txt") == "p" and s.files.read("/home/user/parent.txt") == "p")
        finally:
            for k in kids:
                k.kill()
    finally:
        s.kill()


def api(method, path, body=None):
    import json
    import os
    import urllib.request
    req = urllib.request.Request(os.environ["E2B_API_URL"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"X-API-Key": os.environ["E2B_API_KEY"],
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text.strip() else None


def idle_timeout():
    """Our extension: pause after N seconds with no API traffic, no CPU use and no user
    processes -- not merely no API calls."""
    idle = api("POST", "/sandboxes", {"templateID": "base", "timeout": 300, "idleTimeout": 2, "onIdle": "pause"})
    busy = api("POST", "/sandboxes", {"templateID": "base", "timeout": 300, "idleTimeout": 2, "onIdle": "pause"})
    try:
        b = Sandbox.connect(busy["sandboxID"])
        b.commands.run("sleep 60", background=True)
        time.sleep(4.5)
        check("an idle sandbox is paused after its idle timeout",
              api("GET", f"/sandboxes/{idle['sandboxID']}")["state"] == "paused")
        check("one with a running process is not, though nobody called the API",
              api("GET", f"/sandboxes/{busy['sandboxID']}")["state"] == "running")
    finally:
        for x in (idle, busy):
            api("DELETE", f"/sandboxes/{x['sandboxID']}")


def auto_pause():
    """E2B's autoPause: at its timeout the sandbox is paused, not killed; connecting resumes it."""
    made = api("POST", "/sandboxes", {"templateID": "base", "timeout": 2, "autoPause": True})
    s = Sandbox.connect(made["sandboxID"])
    s.files.write("/home/user/ap.txt", "still here")
    time.sleep(3.5)
    check("autoPause: the timeout pauses the sandbox", api("GET", f"/sandboxes/{s.sandbox_id}")["state"] == "paused")
    s = Sandbox.connect(s.sandbox_id, timeout=60)
    check("and connect resumes it with its files", s.files.read("/home/user/ap.txt") == "still here")
    s.kill()


def demotion():
    """A sandbox paused in memory can be told to let go of it; the server does the same by
    itself under memory pressure (`pressure` mode, run against a server whose floor is above
    the host's memory)."""
    s = Sandbox.create(timeout=300)
    try:
        s.files.write("/home/user/d.txt", "kept")
        s.commands.run("sleep 3600", background=True)
        s.pause()
        check("pause(mode=filesystem) on a sandbox paused in memory releases it",
              s.pause(mode="filesystem") is True)
        s.connect()
        check("its files are kept", s.files.read("/home/user/d.txt") == "kept")
        check("its processes are not", "sleep 3600" not in s.commands.run("ps -eo args").stdout)
    finally:
        s.kill()


def warm_pool():
    """Run against a server started with `--pool base=2`: a create is a pool hit, and the
    caller's env, metadata and timeout are applied to the pre-started sandbox."""
    import urllib.request
    time.sleep(1.5)  # the pool fills in the background
    s = Sandbox.create(envs={"POOLED": "yes"}, metadata={"who": "pool-test"}, timeout=120)
    try:
        check("a pooled sandbox gets the caller's env", s.commands.run("echo $POOLED").stdout == "yes\n")
        check("and metadata", s.get_info().metadata.get("who") == "pool-test")
        import os
        req = urllib.request.Request(os.environ["E2B_API_URL"] + "/metrics",
                                     headers={"X-API-Key": os.environ["E2B_API_KEY"]})
        text = urllib.request.urlopen(req, timeout=10).read().decode()
        hits = [l for l in text.splitlines()
                if l.startswith("ringfence_sandbox_startup_seconds_count") and 'pool="hit"' in l]
        check("the create was counted as a pool hit", hits and float(hits[0].split()[-1]) >= 1, hits)
    finally:
        s.kill()


def pressure():
    s = Sandbox.create(timeout=300)
    try:
        s.files.write("/home/user/p.txt", "kept")
        s.commands.run("sleep 3600", background=True)
        s.pause()
        time.sleep(2)  # the reaper runs every 500 ms
        s.connect()
        check("under memory pressure a paused sandbox keeps its files",
              s.files.read("/home/user/p.txt") == "kept")
        check("and its memory is released (its processes ended)",
              "sleep 3600" not in s.commands.run("ps -eo args").stdout)
    finally:
        s.kill()
    print(f"pressure conformance: {checks.passed} checks passed")


def before_restart():
    a = Sandbox.create(timeout=600)
    a.files.write("/home/user/keep.txt", "frozen")
    a.commands.run("sleep 3600", background=True)
    a.pause()
    b = Sandbox.create(timeout=600)
    b.files.write("/home/user/keep.txt", "files only")
    b.pause(mode="filesystem")
    print(a.sandbox_id, b.sandbox_id)


def after_restart(a_id, b_id):
    a = Sandbox.connect(a_id)
    check("a memory-paused sandbox survives a server restart",
          a.files.read("/home/user/keep.txt") == "frozen"
          and "sleep 3600" in a.commands.run("ps -eo args").stdout)
    b = Sandbox.connect(b_id)
    check("a filesystem-paused sandbox survives a server restart",
          b.files.read("/home/user/keep.txt") == "files only")
    a.kill()
    b.kill()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "before":
        before_restart()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "pressure":
        warm_pool()
        pressure()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "after":
        after_restart(sys.argv[2], sys.argv[3])
        return
    s = Sandbox.create(timeout=600)
    try:
        s.files.write("/home/user/x.txt", "1")
        check("pause returns true", s.pause() is True)
        check("pausing again is a no-op", Sandbox.pause(s.sandbox_id) is False)
        s.connect()
        check("connect resumes a paused sandbox", s.files.read("/home/user/x.txt") == "1")
        contract(s)
    finally:
        s.kill()
    snapshots()
    forks()
    idle_timeout()
    auto_pause()
    demotion()
    print(f"lifecycle conformance: {checks.passed} checks passed")


if __name__ == "__main__":
    main()

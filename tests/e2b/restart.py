"""Sandboxes survive a `kill -9` of the server: phase `before` creates one with state (a file
and a background process) and prints its id; scripts/conformance.sh then SIGKILLs and restarts
the server; phase `after ID` checks that the SDK still works with the same sandbox."""

import sys

from e2b import Sandbox


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok   {name}")


if sys.argv[1] == "before":
    s = Sandbox.create(timeout=120)
    s.files.write("/home/user/state.txt", "kept")
    h = s.commands.run("sleep 300", background=True)
    print(s.sandbox_id, h.pid)
else:
    sid, pid = sys.argv[2], int(sys.argv[3])
    s = Sandbox.connect(sid)
    check("restart: sandbox listed", sid in {x.sandbox_id for x in Sandbox.list().next_items()})
    check("restart: file kept", s.files.read("/home/user/state.txt") == "kept")
    check("restart: process kept", pid in [p.pid for p in s.commands.list()])
    check("restart: commands run", s.commands.run("echo again").stdout == "again\n")
    s.kill()
    check("restart: killed", not s.is_running())
    print("5 passed, 0 failed")

"""Volumes through the unmodified SDK: `Volume.create/connect/get_info/list/destroy` and the
content API with the volume's token, with no sandbox running.

Phase `before`: every content call, the hostile paths and the quota, then leaves a file and
prints the volume id. scripts/conformance.sh kills the server with -9 and starts it again.
Phase `after ID`: the volume and its file are still there; destroy.
"""

import os
import sys

from checks import check
from e2b import Sandbox, Volume
from e2b.exceptions import NotFoundException, SandboxException


def raises(fn, exc=Exception):
    try:
        fn()
    except exc as e:
        return e
    return None


def before():
    vol = Volume.create("conformance-vol")
    check("volumes: create returns an id and a token", vol.volume_id and vol.token, vol.volume_id)
    check("volumes: a second volume of the same name is refused",
          raises(lambda: Volume.create("conformance-vol")) is not None)
    check("volumes: listed", vol.volume_id in [v.volume_id for v in Volume.list()])
    info = Volume.get_info(vol.volume_id)
    check("volumes: get_info gives the name and token", info.name == "conformance-vol" and info.token == vol.token)
    other = raises(lambda: Volume.get_info(vol.volume_id, api_key=os.environ["E2B_API_KEY_2"]),
                   NotFoundException)
    check("volumes: another key cannot see it", other is not None)

    st = vol.write_file("/notes/a.txt", "hello", force=True)
    check("volumes: write_file (force makes the parent) returns its stat",
          st.size == 5 and st.path == "/notes/a.txt" and str(st.type).lower().endswith("file"), st)
    check("volumes: read_file", vol.read_file("/notes/a.txt") == "hello")
    check("volumes: read_file bytes", vol.read_file("/notes/a.txt", format="bytes") == b"hello")
    vol.write_file("/notes/a.txt", "replaced")
    check("volumes: write_file replaces", vol.read_file("/notes/a.txt") == "replaced")
    d = vol.make_dir("/deep/er/dir", force=True)
    check("volumes: make_dir(force) makes parents", str(d.type).lower().endswith("directory"), d)
    check("volumes: make_dir of an existing dir without force fails",
          raises(lambda: vol.make_dir("/deep")) is not None)
    names = sorted(e.path for e in vol.list("/", depth=2))
    check("volumes: list with depth", names == ["/deep", "/deep/er", "/notes", "/notes/a.txt"], names)
    check("volumes: exists", vol.exists("/notes/a.txt") and not vol.exists("/nope"))
    m = vol.update_metadata("/notes/a.txt", mode=0o600, uid=1000, gid=1000)
    check("volumes: update_metadata sets mode and owner", m.mode & 0o777 == 0o600 and m.uid == 1000, m)
    m = vol.update_metadata("/notes/a.txt", mode=0o4755)
    check("volumes: no setuid bit on a volume's file", m.mode & 0o7000 == 0, oct(m.mode))
    vol.remove("/deep")
    check("volumes: remove takes a directory and all it holds", not vol.exists("/deep/er/dir"))
    check("volumes: a missing path is a not-found error",
          raises(lambda: vol.read_file("/missing.txt"), NotFoundException) is not None)
    for bad in ["../../etc/passwd", "/notes/../../x"]:
        check(f"volumes: {bad!r} is refused", raises(lambda: vol.read_file(bad)) is not None)
    stranger = Volume(vol.volume_id, "x", token="rfv_" + "0" * 48)
    check("volumes: a wrong token reads nothing", raises(lambda: stranger.read_file("/notes/a.txt")) is not None)
    # The server runs with --disk 64M: a volume holds as much as a sandbox's disk.
    big = raises(lambda: vol.write_file("/big.bin", b"\0" * (65 << 20)))
    check("volumes: a write beyond the quota is refused and leaves nothing",
          big is not None and not vol.exists("/big.bin"), big)
    for bad in ["relative", "/proc/x", "/a/../b"]:
        err = raises(lambda: Sandbox.create(volume_mounts={bad: vol}), SandboxException)
        check(f"volumes: mount path {bad!r} is refused naming it", err is not None and bad in str(err), err)
    # One volume in two sandboxes at once, at different paths.
    a = Sandbox.create(timeout=300, volume_mounts={"/data": vol})
    b = Sandbox.create(timeout=300, volume_mounts={"/mnt/shared": vol})
    check("volumes: a sandbox sees what the content API wrote",
          a.files.read("/data/notes/a.txt") == "replaced")
    a.commands.run("echo from-a > /data/from-a.txt")
    check("volumes: another sandbox sees what the first wrote, at once",
          b.commands.run("cat /mnt/shared/from-a.txt").stdout == "from-a\n")
    check("volumes: the content API sees it too", vol.read_file("/from-a.txt") == "from-a\n")
    st = vol.get_info("/from-a.txt")
    check("volumes: written by the sandbox's user, stored as uid 1000", st.uid == 1000, st)
    full = b.commands.run("dd if=/dev/zero of=/mnt/shared/fill bs=1M count=80 2>&1; echo rc=$?")
    check("volumes: a sandbox cannot write past the volume's quota (ENOSPC)",
          "No space left" in full.stdout, full.stdout[-200:])
    b.commands.run("rm -f /mnt/shared/fill")
    ran = b.commands.run("printf '#!/bin/sh\\necho ran\\n' > /mnt/shared/s.sh; chmod +x /mnt/shared/s.sh; /mnt/shared/s.sh")
    check("volumes: a script on a volume runs", ran.stdout == "ran\n", ran)
    err = raises(lambda: Volume.destroy(vol.volume_id))
    check("volumes: destroy is refused while a sandbox has it mounted", err is not None, err)
    info = a.commands.run("grep ' /data ' /proc/self/mountinfo")
    check("volumes: no host path shows in the sandbox's mountinfo",
          "/volumes/" not in info.stdout and info.stdout, info.stdout)
    b.kill()
    vol.write_file("/kept.txt", "survives kill -9")
    print(vol.volume_id, a.sandbox_id)


def after(vid, sid):
    vol = Volume.connect(vid)
    check("volumes: after kill -9 the volume is there", vol.name == "conformance-vol")
    check("volumes: after kill -9 its file is there", vol.read_file("/kept.txt") == "survives kill -9")
    a = Sandbox.connect(sid)
    check("volumes: after kill -9 the sandbox still has it mounted",
          a.files.read("/data/kept.txt") == "survives kill -9")
    a.commands.run("echo after > /data/after.txt")
    check("volumes: and writes to it reach the volume", vol.read_file("/after.txt") == "after\n")
    a.kill()
    check("volumes: destroy", Volume.destroy(vid) is True)
    check("volumes: gone", raises(lambda: Volume.get_info(vid), NotFoundException) is not None)
    check("volumes: destroying again says False", Volume.destroy(vid) is False)


if __name__ == "__main__":
    if sys.argv[1] == "before":
        before()
    else:
        after(sys.argv[2], sys.argv[3])

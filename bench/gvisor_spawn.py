#!/usr/bin/env python3
"""The first process start inside a fresh gVisor sandbox: fork + exec against a vfork-style
clone + exec, posix_spawn and an exec alone (a child forked before the clock starts) (bench/gvisor_spawn.c as the sandbox's init, runsc with our flags:
systrap, --network=none, --overlay2=none), one fresh sandbox per sample, modes interleaved.
Prints the median of the first start (call to /bin/echo's exit) and of the later two.

    python3 bench/gvisor_spawn.py [--rounds 15] [--runsc-flags="--overlay2=none"]
                                                      (needs root, gcc, runsc)

`--runsc-flags` replaces `--overlay2=none` (whitespace-separated runsc flags), to compare
runsc's file options.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile

RUNSC = "/usr/local/lib/ringfence/runsc"
MODES = ("fork", "vfork", "posix", "stem")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runsc-flags", default="--overlay2=none")
    a = ap.parse_args()
    if not os.access(RUNSC, os.X_OK) or not shutil.which("gcc"):
        print(f"SKIPPED bench/gvisor_spawn.py: needs {RUNSC} and gcc")
        return
    work = tempfile.mkdtemp()
    os.chmod(work, 0o755)
    exe = os.path.join(work, "gvisor_spawn")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gvisor_spawn.c")
    subprocess.run(["gcc", "-O2", "-static", "-o", exe, src], check=True)
    first = {m: [] for m in MODES}
    later = {m: [] for m in MODES}
    try:
        for r in range(a.rounds):
            for i in range(len(MODES)):
                mode = MODES[(r + i) % len(MODES)]
                bundle = os.path.join(work, "bundle")
                os.makedirs(bundle, exist_ok=True)
                cfg = {"ociVersion": "1.0.2",
                       "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                                   "args": [exe, mode], "env": ["PATH=/usr/bin:/bin"],
                                   "cwd": "/", "noNewPrivileges": True},
                       "root": {"path": "/", "readonly": True}, "hostname": "spawn",
                       "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
                       "linux": {"namespaces": [{"type": t} for t in
                                                ("pid", "ipc", "uts", "mount", "network")]}}
                with open(os.path.join(bundle, "config.json"), "w") as f:
                    json.dump(cfg, f)
                cid = f"bench-spawn-{os.getpid()}-{r}-{mode}"
                state = os.path.join(work, "state")
                out = subprocess.run([RUNSC, f"--root={state}", "--platform=systrap",
                                      "--network=none", *a.runsc_flags.split(), "run", "--bundle",
                                      bundle, cid], capture_output=True, text=True).stdout
                subprocess.run([RUNSC, f"--root={state}", "delete", "--force", cid],
                               capture_output=True)
                for line in out.splitlines():
                    m, i_, _, done = line.split()
                    (first if i_ == "0" else later)[m].append(float(done))
        print(f"loadavg {os.getloadavg()[0]:.2f}; rounds {a.rounds}, modes interleaved; "
              f"runsc flags {a.runsc_flags}")
        for m in MODES:
            print(f"{m:<6} first start {statistics.median(first[m]):6.1f} ms   "
                  f"later {statistics.median(later[m]):6.1f} ms   "
                  f"(first, every round: {' '.join(f'{x:.1f}' for x in first[m])})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""CPU per create -> `bash -l -c 'echo hi'` -> kill cycle of `ringfence serve`, builds interleaved.

With 8 clients on a 2-core host the cycle is CPU-bound, so its latency is about
8 x (CPU per cycle) / 2: this measures the CPU, split into the server process's own (its
threads' utime + stime from /proc) and the whole host's busy time (/proc/stat: the agent,
spawner, bash, kernel threads and this client included), over N sequential cycles after a
warm-up and a wait for a quiet host (bench/api.py's `wait_quiet`). Each repetition runs every
row in turn, each build with a fresh server and data directory.

    python3 bench/server_cpu.py --cycles 200 --reps 3 A/ringfence B/ringfence

--tmpfs adds, for each build, a row whose server keeps sandboxes' writable layers in memory
(`--disk-backend tmpfs`) instead of a filesystem image each: what the image disks cost.
--floor adds two rows of the same command without a server: bubblewrap (bench/run.py's
arguments, with /etc bound so `bash -l` reads the same profile) running it once per cycle,
and the bare command: what a sandbox's worth of namespaces and `bash -l` cost this host.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import api  # noqa: E402
from run import BWRAP_ARGS  # noqa: E402

COMMAND = ["/bin/bash", "-l", "-c", "echo hi"]


def process_ticks(pid):
    """utime + stime of every thread of `pid`, in clock ticks."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that ended meanwhile; its time is in the process
            continue
        total += int(f[11]) + int(f[12])
    return total


def host_busy_ticks():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f[:8]) - f[3] - f[4]  # user .. steal, less idle and iowait


def measure(run_one, cycles, warmup, pid=None):
    """(process CPU or None, host busy, wall) in ms per cycle."""
    ms_per_tick = 1000 / os.sysconf("SC_CLK_TCK")
    for _ in range(warmup):
        run_one()
    api.wait_quiet()
    s0 = process_ticks(pid) if pid else 0
    h0, t0 = host_busy_ticks(), time.perf_counter()
    for _ in range(cycles):
        run_one()
    wall = (time.perf_counter() - t0) * 1e3 / cycles
    own = (process_ticks(pid) - s0) * ms_per_tick / cycles if pid else None
    return own, (host_busy_ticks() - h0) * ms_per_tick / cycles, wall


def serve_row(binary, extra, cycles, warmup):
    srv, port, key, data, _ = api.start_server(binary, extra)
    try:
        c = api.Client(port, key)
        return measure(lambda: api.cycle(c), cycles, warmup, srv.pid)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def command_row(prefix, cycles, warmup):
    home = tempfile.mkdtemp()  # an empty home: no one's dotfiles in `bash -l`
    env = {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin"}

    def one():
        out = subprocess.run([*prefix, *COMMAND], env=env, stdout=subprocess.PIPE, check=True).stdout
        if out != b"hi\n":
            raise RuntimeError(f"unexpected output {out!r}")
    try:
        return measure(one, cycles, warmup)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tmpfs", action="store_true", help="also each build with tmpfs disks")
    ap.add_argument("--floor", action="store_true", help="also bubblewrap and the bare command")
    ap.add_argument("bins", nargs="+")
    a = ap.parse_args()
    rows = []  # (label, function)
    for b in a.bins:
        rows.append((b, lambda b=b: serve_row(b, (), a.cycles, a.warmup)))
        if a.tmpfs:
            rows.append((f"{b} (tmpfs disks)",
                         lambda b=b: serve_row(b, ("--disk-backend", "tmpfs"), a.cycles, a.warmup)))
    if a.floor:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            sys.exit("--floor needs bwrap (bench/setup.sh)")
        i = BWRAP_ARGS.index("--")
        args = [bwrap, *BWRAP_ARGS[:i], "--ro-bind", "/etc", "/etc", *BWRAP_ARGS[i:]]
        rows.append(("bwrap, no server", lambda: command_row(args, a.cycles, a.warmup)))
        rows.append(("bare command, no server", lambda: command_row([], a.cycles, a.warmup)))
    results = {label: [] for label, _ in rows}
    print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; {a.cycles} cycles per run; "
          f"command {' '.join(COMMAND)!r}")
    for rep in range(a.reps):
        order = rows if rep % 2 == 0 else list(reversed(rows))
        for label, fn in order:
            r = fn()
            results[label].append(r)
            own = f"server {r[0]:.2f} ms, " if r[0] is not None else ""
            print(f"rep {rep} {label}: {own}host busy {r[1]:.2f} ms, wall {r[2]:.2f} ms per cycle",
                  flush=True)
    print(f"\n{'row':<48} {'server CPU':>11} {'host busy':>10} {'wall':>8}   (ms per cycle, medians)")
    for label, rs in results.items():
        own = [r[0] for r in rs if r[0] is not None]
        own_s = f"{statistics.median(own):>11.2f}" if own else f"{'-':>11}"
        print(f"{label:<48} {own_s} {statistics.median(r[1] for r in rs):>10.2f} "
              f"{statistics.median(r[2] for r in rs):>8.2f}")


if __name__ == "__main__":
    main()

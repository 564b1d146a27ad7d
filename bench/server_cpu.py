#!/usr/bin/env python3
"""CPU per create -> `bash -l -c 'echo hi'` -> kill cycle of `ringfence serve`, builds interleaved.

With 8 clients on a 2-core host the cycle is CPU-bound, so its latency is about
8 x (CPU per cycle) / 2: this measures the CPU, split into the server process's own (its
threads' utime + stime from /proc) and the whole host's busy time (/proc/stat: the agent,
spawner, bash, kernel threads and this client included), over N sequential cycles after a
warm-up and a wait for a quiet host (bench/api.py's `wait_quiet`). Each repetition runs every
build in turn, each with a fresh server and data directory.

    python3 bench/server_cpu.py --cycles 200 --reps 3 A/ringfence B/ringfence
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import api  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("bins", nargs="+")
    a = ap.parse_args()
    ms_per_tick = 1000 / os.sysconf("SC_CLK_TCK")
    rows = {b: [] for b in a.bins}
    print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; {a.cycles} cycles per run")
    for rep in range(a.reps):
        order = a.bins if rep % 2 == 0 else list(reversed(a.bins))
        for b in order:
            srv, port, key, _, _ = api.start_server(b)
            try:
                c = api.Client(port, key)
                for _ in range(a.warmup):
                    api.cycle(c)
                api.wait_quiet()
                s0, h0, t0 = process_ticks(srv.pid), host_busy_ticks(), time.perf_counter()
                for _ in range(a.cycles):
                    api.cycle(c)
                wall = (time.perf_counter() - t0) * 1e3 / a.cycles
                s1, h1 = process_ticks(srv.pid), host_busy_ticks()
                r = ((s1 - s0) * ms_per_tick / a.cycles, (h1 - h0) * ms_per_tick / a.cycles, wall)
                rows[b].append(r)
                print(f"rep {rep} {b}: server {r[0]:.2f} ms, host busy {r[1]:.2f} ms, wall {r[2]:.2f} ms per cycle",
                      flush=True)
            finally:
                srv.terminate()
                srv.wait(timeout=30)
    print(f"\n{'build':<40} {'server CPU':>11} {'host busy':>10} {'wall':>8}   (ms per cycle, medians)")
    for b, rs in rows.items():
        print(f"{b:<40} {statistics.median(r[0] for r in rs):>11.2f} "
              f"{statistics.median(r[1] for r in rs):>10.2f} {statistics.median(r[2] for r in rs):>8.2f}")


if __name__ == "__main__":
    main()

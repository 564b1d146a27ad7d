#!/usr/bin/env python3
"""In-memory pause and resume latency of two builds, interleaved operation by operation.

    python3 bench/pause_ab.py --a OLD/ringfence --b NEW/ringfence [--rounds 40]

bench/lifecycle.py's pause section, as bench/ab.py runs it, compares whole runs minutes
apart; a few of them can differ by several times on a loaded host. Here both servers are up
at once (bench/cpu.py's Server: fresh data and run dirs), each with one sandbox holding a
shell and 20 MiB written, and round i pauses (memory), reads the metrics (as lifecycle.py
does), resumes and checks the file, on A then B (B then A on odd rounds). It prints each
build's median and quartiles and, per round, B's time minus A's: their median, and in how
many rounds B was the slower.

Python 3.11 standard library only; needs root.
"""

import argparse
import importlib.util
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("cpubench", os.path.join(HERE, "cpu.py"))
cpubench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpubench)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()
    servers = {}
    try:
        servers = {w: cpubench.Server(b, f"p{w}", []) for w, b in (("A", a.a), ("B", a.b))}
        for s in servers.values():
            s.sid, s.tok = s.c.create()
            s.c.run(s.sid, s.tok, "head -c 20M /dev/zero > /home/user/f; sleep 3600 >/dev/null 2>&1 &")
            s.quiet()
        res = {w: {"pause": [], "resume": []} for w in servers}
        for i in range(a.rounds):
            for w in (("A", "B") if i % 2 == 0 else ("B", "A")):
                s = servers[w]
                t0 = time.perf_counter()
                s.call("POST", f"/sandboxes/{s.sid}/pause", {"memory": True})
                t1 = time.perf_counter()
                s.call("GET", f"/sandboxes/{s.sid}/metrics")
                t2 = time.perf_counter()
                s.call("POST", f"/sandboxes/{s.sid}/connect", {"timeout": 300})
                t3 = time.perf_counter()
                out = s.c.run(s.sid, s.tok, "wc -c < /home/user/f")
                if out.strip() != b"20971520":
                    raise RuntimeError(f"the file did not survive pause/resume: {out!r}")
                res[w]["pause"].append((t1 - t0) * 1e3)
                res[w]["resume"].append((t3 - t2) * 1e3)
        print(f"A = {a.a}\nB = {a.b}\n{a.rounds} rounds, loadavg {os.getloadavg()[0]:.2f}")
        for k in ("pause", "resume"):
            for w in ("A", "B"):
                q = statistics.quantiles(res[w][k], n=4)
                print(f"  {k:<7} {w}: median {statistics.median(res[w][k]):7.2f} ms  quartiles {q[0]:.2f}-{q[2]:.2f} ms")
            d = [y - x for x, y in zip(res["A"][k], res["B"][k])]
            print(f"  {k:<7} B - A per round: median {statistics.median(d):+.2f} ms; "
                  f"B slower in {sum(x > 0 for x in d)}/{len(d)}")
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()

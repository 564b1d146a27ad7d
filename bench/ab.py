#!/usr/bin/env python3
"""Two builds, one interleaved run: a bench script run alternately against binary A and B.

    python3 bench/ab.py --a OLD/ringfence --b NEW/ringfence [--reps 5] -- bench/api.py --rounds 40

Each repetition runs the script once with `--bin A`, once with `--bin B`, in an order that
alternates (A B, B A, A B, ...) so that neither build always runs first, on a warmer or a
busier host. Every "name ... median ... p95" line the script prints (the formats of
bench/api.py and bench/lifecycle.py) and every "= N sandboxes/s" throughput is collected per
section. The table shows, per metric, the median over the repetitions of each build's value,
B's change against A, and the spread of the paired changes: repetition i's B against
repetition i's A (the two ran back to back, under about the same load), as median [min, max].
Run it with the same binary as A and B (an A/A run) to see how far the host's noise alone
moves each metric; `--save FILE` keeps every repetition's values as JSON. On a shared host
these wall-clock figures move by more than a few per cent on their own: bench/cpu.py compares
two builds by CPU time per operation, interleaved batch by batch, instead.

Python 3.11 standard library only. Each script starts its own server with a fresh data dir.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

API_LINE = re.compile(r"^\s{2}(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s*$")
LIFE_LINE = re.compile(r"^\s{2}(\S.*?)\s+median\s+([\d.]+)\s+(\S+)\s+p95\s+([\d.]+)")
THROUGHPUT = re.compile(r"=\s*([\d.]+)\s+sandboxes/s")
# "  fork(count=10): 117 ms in all; ...": one figure, no spread.
SINGLE_MS = re.compile(r"^\s{2}(\S[^:]*):\s+([\d.]+)\s+ms\b")


def parse(out):
    """{(section, metric): value} from one run's stdout."""
    found = {}
    section = ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            section = line.split(":")[0].strip()
            t = THROUGHPUT.search(line)
            if t:
                found[(section, "throughput (sandboxes/s)")] = float(t.group(1))
            continue
        m = LIFE_LINE.match(line)
        if m:
            found[(section, f"{m.group(1)} median ({m.group(3)})")] = float(m.group(2))
            found[(section, f"{m.group(1)} p95 ({m.group(3)})")] = float(m.group(4))
            continue
        m = SINGLE_MS.match(line)
        if m:
            found[(section, f"{m.group(1)} (ms)")] = float(m.group(2))
            continue
        m = API_LINE.match(line)
        if m and m.group(1) != "metric":
            found[(section, f"{m.group(1)} median (ms)")] = float(m.group(2))
            found[(section, f"{m.group(1)} p95 (ms)")] = float(m.group(3))
    return found


def run(script, binary):
    cmd = [sys.executable] + script[:1] + ["--bin", binary] + script[1:]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return parse(p.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the baseline binary")
    ap.add_argument("--b", required=True, help="the binary compared with it")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--save", help="write every repetition's values (and the load) here, as JSON")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    a = ap.parse_args()
    script = [s for s in a.script if s != "--"]
    results = {"A": [], "B": []}
    loads = []
    for rep in range(a.reps):
        order = ["A", "B"] if rep % 2 == 0 else ["B", "A"]
        for which in order:
            results[which].append(run(script, a.a if which == "A" else a.b))
        loads.append(os.getloadavg()[0])
        print(f"rep {rep + 1}/{a.reps} done ({' '.join(order)}), loadavg {loads[-1]:.2f}", file=sys.stderr)
    keys = [k for k in results["A"][0] if all(k in r for r in results["A"] + results["B"])]
    if a.save:
        with open(a.save, "w") as f:
            json.dump({"script": script, "a": a.a, "b": a.b, "loadavg_after_each_rep": loads,
                       "reps": {w: [{f"{k[0]} | {k[1]}": r[k] for k in keys} for r in results[w]]
                                for w in ("A", "B")}}, f, indent=1)
    print(f"{' '.join(script)}: {a.reps} reps each, interleaved; A = {a.a}, B = {a.b}; "
          f"loadavg {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'section':<30} {'metric':<52} {'A':>10} {'B':>10} {'B vs A':>8}   paired B/A: median [min, max]")
    for k in keys:
        va = statistics.median(r[k] for r in results["A"])
        vb = statistics.median(r[k] for r in results["B"])
        change = (vb - va) / va * 100 if va else 0.0
        pairs = [(rb[k] - ra[k]) / ra[k] * 100 for ra, rb in zip(results["A"], results["B"]) if ra[k]]
        spread = (f"{statistics.median(pairs):+6.1f}% [{min(pairs):+6.1f}, {max(pairs):+6.1f}]"
                  if pairs else "")
        print(f"{k[0][:30]:<30} {k[1][:52]:<52} {va:>10.2f} {vb:>10.2f} {change:>+7.1f}%   {spread}")


if __name__ == "__main__":
    main()

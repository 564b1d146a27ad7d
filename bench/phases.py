#!/usr/bin/env python3
"""Medians of the phase timings a server logged with RINGFENCE_PHASES=1 (crates/core/src/phases.rs).

Reads a server log (RINGFENCE_LOG=info or more) and prints, per timed request kind (create,
prestart, cell) and per agent phase, the median and p90 of each phase in milliseconds.
`--skip N` leaves out each kind's first N lines (warm-up).

    python3 bench/phases.py DATA_DIR/serve.log [--skip 2]
"""

import argparse
import re
import statistics
from collections import defaultdict

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--skip", type=int, default=0)
    a = ap.parse_args()
    kinds = defaultdict(list)  # kind -> [dict(phase -> ms)]
    for raw in open(a.log, errors="replace"):
        line = ANSI.sub("", raw)
        if "ringfence::phases" not in line:
            continue
        body = line.split("ringfence::phases:", 1)[-1].strip()
        if body.startswith("agent "):
            m = re.match(r"agent (\S+) took=([\d.]+)ms", body)
            if m:
                kinds["agent " + m.group(1)].append({"took": float(m.group(2))})
            continue
        m = re.match(r"(\S+) at=[\d.]+ms (?:total|took)=([\d.]+)ms:?(.*)", body)
        if not m:
            continue
        d = {"total": float(m.group(2))}
        for part in m.group(3).split():
            k, _, v = part.partition("=")
            d[k] = float(v)
        kinds[m.group(1)].append(d)
    for kind, rows in kinds.items():
        rows = rows[a.skip:]
        if not rows:
            continue
        print(f"{kind}  (n={len(rows)})")
        names = []
        for r in rows:
            for k in r:
                if k not in names:
                    names.append(k)
        for k in names:
            xs = [r[k] for r in rows if k in r]
            print(f"  {k:<22} median {statistics.median(xs):7.3f} ms   p90 {pct(xs, 90):7.3f} ms")


if __name__ == "__main__":
    main()

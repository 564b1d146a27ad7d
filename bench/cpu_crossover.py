#!/usr/bin/env python3
"""Combines two bench/cpu.py runs with the builds' places swapped into one estimate.

    python3 bench/cpu.py --a OLD --b NEW --save ab.json
    python3 bench/cpu.py --a NEW --b OLD --save ba.json
    python3 bench/cpu_crossover.py ab.json ba.json [aa.json]
    python3 bench/cpu_crossover.py --many ab1.json ba1.json ab2.json ba2.json ...

Why: in bench/cpu.py's `together` mode the two servers do not sit in quite the same place
(one is started first, its client thread starts first), and an A/A run shows that this alone
can move a short operation's CPU time by several per cent. Run both ways, the place's effect
p and the build's effect d add up as (d + p) in the first run and (-d + p) in the second, so
d = (first - second) / 2 and p = (first + second) / 2. Changes are taken as log ratios
(batch i of the second-placed server against batch i of the first), their medians per run;
the 95 % interval comes from resampling each run's batches (bootstrap). An A/A run's file,
if given, is shown beside as a direct measure of p.

Python 3.11 standard library only.
"""

import json
import math
import random
import statistics
import sys

METRICS = ("total cpu (ms/op)", "server cpu (ms/op)")


def log_ratios(run, label, metric):
    per = run["results"][label]
    return [math.log(b[metric] / a[metric]) for a, b in zip(per["A"], per["B"]) if a[metric] > 0 and b[metric] > 0]


def totals(run, label, metric):
    i = METRICS.index(metric)
    a, b = run["results"][label]["all_ops"]["A"][i], run["results"][label]["all_ops"]["B"][i]
    return math.log(b / a)


def pct(x):
    return (math.exp(x) - 1) * 100


# Student's t, two-sided 95 %, by degrees of freedom (1-30); beyond, the normal's 1.96.
T975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13,
        2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def many(paths):
    if len(paths) < 4 or len(paths) % 2:
        sys.exit("--many takes pairs of files (A/B, then B/A), at least two pairs")
    runs = [json.load(open(p)) for p in paths]
    pairs = list(zip(runs[0::2], runs[1::2]))
    labels = [lb for lb in pairs[0][0]["results"] if all(lb in ab["results"] and lb in ba["results"]
                                                          for ab, ba in pairs)]
    print(f"{len(pairs)} crossovers; new vs old per crossover (median of paired batches), then their "
          "mean with a 95 % t interval")
    for label in labels:
        # The batches' wall-clock medians too: paired at the same moment, they are far steadier
        # than whole runs minutes apart.
        for m in METRICS + ("wall median (ms)",):
            ds = [(statistics.median(log_ratios(ab, label, m)) - statistics.median(log_ratios(ba, label, m))) / 2
                  for ab, ba in pairs]
            mean = statistics.mean(ds)
            half = T975[min(len(ds) - 2, 29)] * statistics.stdev(ds) / math.sqrt(len(ds))
            print(f"{label:<34} {m:<20} mean {pct(mean):+5.1f}% [{pct(mean - half):+.1f}, {pct(mean + half):+.1f}]"
                  f"  sd {statistics.stdev(ds) * 100:.1f}%  each: {' '.join(f'{pct(d):+.1f}' for d in ds)}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--many":
        return many(sys.argv[2:])
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    ab, ba = (json.load(open(p)) for p in sys.argv[1:3])
    aa = json.load(open(sys.argv[3])) if len(sys.argv) == 4 else None
    if ab["a"] != ba["b"] or ab["b"] != ba["a"]:
        sys.exit(f"the second run must swap the first's builds: {ab['a']}, {ab['b']} vs {ba['a']}, {ba['b']}")
    print(f"old = {ab['a']}\nnew = {ab['b']}")
    print(f"{'operation':<34} {'metric':<20} {'new vs old (median)':>20} {'95 % CI':>16} "
          f"{'all ops':>8} {'place effect':>12}" + ("   A/A run" if aa else ""))
    rng = random.Random(13)
    for label in ab["results"]:
        if label not in ba["results"]:
            continue
        for m in METRICS:
            x, y = log_ratios(ab, label, m), log_ratios(ba, label, m)
            d = (statistics.median(x) - statistics.median(y)) / 2
            p = (statistics.median(x) + statistics.median(y)) / 2
            boots = sorted((statistics.median(rng.choices(x, k=len(x)))
                            - statistics.median(rng.choices(y, k=len(y)))) / 2 for _ in range(4000))
            lo, hi = boots[100], boots[3899]
            whole = (totals(ab, label, m) - totals(ba, label, m)) / 2
            extra = ""
            if aa and label in aa["results"]:
                extra = f"   {pct(statistics.median(log_ratios(aa, label, m))):+6.1f}%"
            print(f"{label:<34} {m:<20} {pct(d):>+19.1f}% {f'[{pct(lo):+.1f}, {pct(hi):+.1f}]':>16} "
                  f"{pct(whole):>+7.1f}% {pct(p):>+11.1f}%{extra}")


if __name__ == "__main__":
    main()

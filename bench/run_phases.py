#!/usr/bin/env python3
"""Where `ringfence run -- /bin/true` spends its time: `--report` phases, variants interleaved.

    python3 bench/run_phases.py [--ringfence PATH] [--rounds N] [--rest MS]
                                [--variant NAME='FLAGS' ...] [-- CMD ...]

Each round runs every variant once (order rotated per round), each after `--rest` of idle
time, with `--report`. Prints, per variant, the median wall time (from outside, as
bench/run.py takes it) and the median duration of each step of `--report`'s `phases_ms`
(the time from the previous phase's end to this one's), so two ways of doing one step can
be compared in one run on a shared host. A variant's FLAGS may start with `bin=PATH ` to
run another build. Without `--variant`: the default run only.

Python 3.11 standard library only.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ringfence",
                    default=str(REPO / "target/x86_64-unknown-linux-gnu/release/ringfence"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rest", metavar="MS", type=int, default=100)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    ap.add_argument("cmd", nargs="*", default=["/bin/true"])
    args = ap.parse_args()
    variants = []
    for v in args.variant or ["default="]:
        name, _, flags = v.partition("=")
        words = shlex.split(flags)
        binary = args.ringfence
        if words and words[0].startswith("bin="):
            binary = words.pop(0)[4:]
        variants.append((name, binary, words))
    walls = {n: [] for n, _, _ in variants}
    steps = {n: {} for n, _, _ in variants}
    order = {n: [] for n, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        for rnd in range(args.warmup + args.rounds):
            k = rnd % len(variants)
            for name, binary, flags in variants[k:] + variants[:k]:
                time.sleep(args.rest / 1000)
                argv = [binary, "run", "-q", *flags, "--report", str(report), "--", *args.cmd]
                t = time.perf_counter_ns()
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
                wall = (time.perf_counter_ns() - t) / 1e6
                if r.returncode != 0:
                    raise SystemExit(f"{name}: exit {r.returncode}: {r.stderr.decode()[-400:]}")
                if rnd < args.warmup:
                    continue
                walls[name].append(wall)
                phases = json.loads(report.read_text())["phases_ms"]
                prev = 0.0
                for step, at in phases:
                    steps[name].setdefault(step, []).append(at - prev)
                    if step not in order[name]:
                        order[name].append(step)
                    prev = at
                # Outside every phase: the exec up to `main`, and from the last phase to the
                # process's end as the caller sees it (report, cleanup, exit).
                steps[name].setdefault("(outside the phases)", []).append(wall - prev)
    names = [n for n, _, _ in variants]
    print(f"{args.rounds} rounds, rest {args.rest} ms; medians in ms")
    print(f"{'step (ends when)':<28}" + "".join(f"{n:>16}" for n in names))
    all_steps = []
    for n in names:
        for s in order[n]:
            if s not in all_steps:
                all_steps.append(s)
    all_steps.append("(outside the phases)")
    for s in all_steps:
        row = ""
        for n in names:
            xs = steps[n].get(s)
            row += f"{statistics.median(xs):>16.2f}" if xs else f"{'-':>16}"
        print(f"{s:<28}{row}")
    print(f"{'wall (outside)':<28}" + "".join(f"{statistics.median(walls[n]):>16.2f}"
                                             for n in names))
    first = names[0]
    for n in names[1:]:
        ratios = [b / a for a, b in zip(walls[first], walls[n])]
        print(f"{n} / {first}, median of per-round wall ratios: {statistics.median(ratios):.3f}")
    try:
        print("load average", open("/proc/loadavg").read().split()[:3])
    except OSError:
        pass


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What spawners save: `ringfence run -- /bin/true` with and without them, interleaved.

    python3 bench/spawner.py [--ringfence PATH] [--pairs N] [--rest MS]

Each pair runs both, in alternating order, each after `--rest` of idle time (back-to-back
runs share the RCU grace period a cgroup move waits for, which hides part of its cost).
Prints the wall-time median and the median of the cgroup-move phase (`cgroup_attached` minus
`id_maps` in `--report`'s phases) of each. Python 3.11 standard library only.
"""

import argparse
import json
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
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--rest", metavar="MS", type=int, default=300)
    args = ap.parse_args()
    kinds = [("spawner", []), ("no-spawner", ["--no-spawner"])]
    wall: dict[str, list[float]] = {k: [] for k, _ in kinds}
    move: dict[str, list[float]] = {k: [] for k, _ in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        for i in range(args.pairs):
            for name, extra in (kinds if i % 2 == 0 else kinds[::-1]):
                time.sleep(args.rest / 1000)
                t = time.perf_counter_ns()
                subprocess.run([args.ringfence, "run", "--report", str(report), *extra, "--",
                                "/bin/true"], check=True)
                wall[name].append((time.perf_counter_ns() - t) / 1e6)
                phases = dict(json.loads(report.read_text())["phases_ms"])
                move[name].append(phases["cgroup_attached"] - phases["id_maps"])
    for name, _ in kinds:
        print(f"{name:<11} wall median {statistics.median(wall[name]):6.1f} ms   "
              f"cgroup move median {statistics.median(move[name]):6.2f} ms")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks the performance specification (docs/SPECIFICATION.md) on this machine.

    python3 bench/spec.py [--ringfence PATH] [--runs N] [--pause MS] [--spec docs/SPECIFICATION.md]

Runs bench/run.py with ringfence and bubblewrap side by side, interleaved, and compares each
workload's ratio ringfence / bwrap against the bound the specification's `spec` block sets.
The ratio is the median over rounds of the per-round ratio (each round runs both once, next to
each other), so that load which comes and goes during the run moves both sides of a ratio
together instead of skewing whichever runner it happened to hit.

Then, where the block has `serve_concurrency`, runs bench/api.py once against a fresh
`ringfence serve` and checks its concurrency gain: sandboxes per second (create -> first
output -> kill cycles) with N clients over the same with one client, both phases of the same
run. A server that serialises its requests (a runtime worker blocked in the kernel, a lock
held across a wait) gains nothing from more clients however fast each request is.

Exits 1 naming every bound that is exceeded, 2 if a measurement itself failed.

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def load_spec(path: Path) -> dict:
    """The JSON block fenced as ```json spec in the specification."""
    text = path.read_text()
    m = re.search(r"```json spec\n(.*?)\n```", text, re.S)
    if not m:
        raise SystemExit(f"spec: no ```json spec block in {path}")
    return json.loads(m.group(1))


def paired_ratios(samples: list[dict], workload: str, runner: str, ref: str) -> list[float]:
    by_round: dict[int, dict[str, int]] = {}
    for s in samples:
        if s["workload"] == workload and not s.get("warmup") and s.get("rc") == 0:
            by_round.setdefault(s["round"], {})[s["runner"]] = s["wall_ns"]
    return [r[runner] / r[ref] for r in by_round.values() if runner in r and ref in r and r[ref]]


THROUGHPUT = re.compile(r"^(sequential, 1 client|\d+ concurrent clients): .*= ([\d.]+) sandboxes/s")


def concurrency_gain(ringfence: str, clients: int, rounds: int) -> float | None:
    """Throughput with `clients` clients over throughput with one, from one bench/api.py run."""
    cmd = [sys.executable, str(BENCH_DIR / "api.py"), "--bin", ringfence, "--rounds", str(rounds),
           "--warmup", "10", "--concurrency", str(clients)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout, end="")
    rates = {m.group(1): float(m.group(2))
             for m in map(THROUGHPUT.match, r.stdout.splitlines()) if m}
    one, many = rates.get("sequential, 1 client"), rates.get(f"{clients} concurrent clients")
    if r.returncode != 0 or not one or many is None:
        print(f"spec: the serve measurement failed ({' '.join(cmd)}): {r.stderr[-2000:]}",
              file=sys.stderr)
        return None
    return many / one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ringfence", metavar="PATH",
                    default=str(REPO_ROOT / "target/x86_64-unknown-linux-gnu/release/ringfence"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--pause", metavar="MS", type=int, default=100,
                    help="rest between runs, as a host that runs a command now and then")
    ap.add_argument("--spec", type=Path, default=REPO_ROOT / "docs/SPECIFICATION.md")
    ap.add_argument("--serve-only", action="store_true",
                    help="only the serve concurrency check (no bubblewrap rounds)")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    failed = []
    if not args.serve_only:
        code = check_run_vs_bwrap(args, spec["run_vs_bwrap"], failed)
        if code:
            return code
    conc = spec.get("serve_concurrency")
    if conc:
        bound = float(conc["min_throughput_gain"])
        clients, rounds = int(conc["clients"]), int(conc.get("rounds", 80))
        gain = concurrency_gain(args.ringfence, clients, rounds)
        # Each phase lasts about a second: a burst of other work on a shared CI host can take
        # a run below the bound. A second run decides; a server that serialises its requests
        # misses it every time (0.86-0.92 against a bound of 1.2, docs/SPECIFICATION.md).
        if gain is not None and gain < bound:
            print(f"serve concurrency gain {gain:.2f} is under {bound}: measuring once more")
            again = concurrency_gain(args.ringfence, clients, rounds)
            gain = None if again is None else max(gain, again)
        if gain is None:
            return 2
        ok = gain >= bound
        print(f"serve, {conc['clients']} clients / 1 client, sandboxes per second: {gain:.2f} "
              f"(bound: at least {bound:.2f})  {'ok' if ok else 'BELOW'}")
        if not ok:
            failed.append(f"serve concurrency gain {gain:.2f}, the bound is at least {bound}")
    if failed:
        print("spec: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("spec: every bound holds")
    return 0


def check_run_vs_bwrap(args, bounds: dict[str, float], failed: list[str]) -> int:
    """`ringfence run` against bubblewrap: appends to `failed`; 2 if the measurement failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, str(BENCH_DIR / "run.py"), "--runs", str(args.runs),
               "--warmup", "3", "--pause", str(args.pause), "--only", "ringfence,bwrap",
               "--ringfence", args.ringfence,
               "--json", str(out)]
        r = subprocess.run(cmd)
        if r.returncode != 0 or not out.exists():
            print(f"spec: the measurement failed ({' '.join(cmd)})", file=sys.stderr)
            return 2
        data = json.loads(out.read_text())
    print(f"\n{'workload':<10} {'ringfence/bwrap (paired median)':>32} {'bound':>7}")
    for workload, bound in bounds.items():
        ratios = paired_ratios(data["samples"], workload, "ringfence", "bwrap")
        if len(ratios) < max(5, args.runs // 2):
            print(f"spec: too few paired rounds for {workload} ({len(ratios)})", file=sys.stderr)
            return 2
        ratio = statistics.median(ratios)
        ok = ratio <= bound
        print(f"{workload:<10} {ratio:>32.2f} {bound:>7.2f}  {'ok' if ok else 'EXCEEDED'}")
        if not ok:
            failed.append(f"{workload}: ringfence is {ratio:.2f}x bwrap, the bound is {bound}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

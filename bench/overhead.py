#!/usr/bin/env python3
"""Cost of a change on the API bench: the create -> echo -> kill cycle of bench/api.py against
two `ringfence` binaries at once, interleaved cycle by cycle (sequential) and block by block (8
concurrent clients), so that whatever else the host is doing hits both alike.

    python3 bench/overhead.py --base /path/to/old/ringfence --new target/.../release/ringfence \
        [--rounds 200] [--blocks 10] [--concurrency 8]

Each binary serves on its own port with its own data directory, started as bench/api.py starts
it. Used for the observability overhead in docs/PERFORMANCE.md (base: the commit before metrics
and auditing; new: with them).
"""

import argparse
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import Client, cycle, pct  # noqa: E402

METRICS = [("create", "create (POST /v2/sandboxes)"), ("first_output", "create -> first output of echo"),
           ("cycle", "create -> echo -> kill")]


def start(binary):
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
    srv = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--pids", "256"],
                           stdout=log, stderr=log, env=dict(os.environ, RINGFENCE_LOG="warn"))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    # The code interpreter's fork server binds a fixed socket path while it starts: let one
    # server's finish before the next starts its own.
    time.sleep(5)
    return srv, port, key


def concurrent(port, key, clients, per):
    results, errors = [], []
    lock = threading.Lock()

    def worker():
        c = Client(port, key)
        for _ in range(per):
            try:
                r = cycle(c)
                with lock:
                    results.append(r)
            except Exception as e:  # counted and shown, never hidden
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} errors, first: {errors[0]}")
    return results, time.perf_counter() - t


def segments(c):
    """One cycle, split where the server's work differs: create, Start until the first output,
    first output until the end of the stream (the execution's audit record is written before
    its `end` event), kill."""
    t0 = time.perf_counter()
    sid, token = c.create()
    t1 = time.perf_counter()
    msg = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"]}, "stdin": False}).encode()
    c.conn.request("POST", "/process.Process/Start", body=b"\0" + struct.pack(">I", len(msg)) + msg, headers={
        "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
        "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token})
    r = c.conn.getresponse()
    t_first = None
    while True:
        head = r.read(5)
        if len(head) < 5:
            break
        data = json.loads(r.read(struct.unpack(">I", head[1:])[0]))
        if "data" in data.get("event", {}) and t_first is None:
            t_first = time.perf_counter()
        if head[0] & 2:
            break
    r.read()
    t2 = time.perf_counter()
    c.kill(sid)
    t3 = time.perf_counter()
    return {"create": (t1 - t0) * 1e3, "Start -> first output": (t_first - t1) * 1e3,
            "first output -> end of stream": (t2 - t_first) * 1e3, "kill": (t3 - t2) * 1e3}


def report(label, res, walls=None):
    print(f"\n{label}")
    print(f"  {'metric':<34} {'base median':>12} {'new median':>11} {'change':>8} {'base p95':>9} {'new p95':>8}")
    for k, name in METRICS:
        b = [r[k] for r in res["base"]]
        n = [r[k] for r in res["new"]]
        mb, mn = statistics.median(b), statistics.median(n)
        print(f"  {name:<34} {mb:>12.2f} {mn:>11.2f} {(mn - mb) / mb * 100:>+7.1f}% {pct(b, 95):>9.2f} {pct(n, 95):>8.2f}")
    if walls:
        tb = len(res["base"]) / sum(walls["base"])
        tn = len(res["new"]) / sum(walls["new"])
        print(f"  {'throughput (sandboxes/s)':<34} {tb:>12.1f} {tn:>11.1f} {(tn - tb) / tb * 100:>+7.1f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--rounds", type=int, default=200, help="sequential cycles per binary")
    ap.add_argument("--blocks", type=int, default=10, help="concurrent blocks per binary")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--per", type=int, default=5, help="cycles per client per block")
    ap.add_argument("--segments", type=int, default=0, help="also time N alternating cycles in parts")
    a = ap.parse_args()
    servers = {w: start(getattr(a, w)) for w in ("base", "new")}
    try:
        clients = {w: Client(p, k) for w, (_, p, k) in servers.items()}
        print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}")
        for w in ("base", "new"):
            for _ in range(5):
                cycle(clients[w])  # warm-up
        seq = {"base": [], "new": []}
        for i in range(a.rounds):
            for w in (("base", "new") if i % 2 == 0 else ("new", "base")):
                seq[w].append(cycle(clients[w]))
        report(f"sequential, 1 client, {a.rounds} cycles each, alternating", seq)
        con, walls = {"base": [], "new": []}, {"base": [], "new": []}
        for i in range(a.blocks):
            for w in (("base", "new") if i % 2 == 0 else ("new", "base")):
                _, port, key = servers[w]
                r, wall = concurrent(port, key, a.concurrency, a.per)
                con[w].extend(r)
                walls[w].append(wall)
        report(f"{a.concurrency} concurrent clients, {a.blocks} blocks of {a.concurrency * a.per} cycles each, "
               f"alternating", con, walls)
        if a.segments:
            seg = {"base": [], "new": []}
            for i in range(a.segments):
                for w in (("base", "new") if i % 2 == 0 else ("new", "base")):
                    seg[w].append(segments(clients[w]))
            print(f"\nsequential cycle in parts, {a.segments} cycles each, alternating (medians)")
            print(f"  {'part':<34} {'base ms':>9} {'new ms':>9} {'diff ms':>9}")
            for k in seg["base"][0]:
                b = statistics.median(r[k] for r in seg["base"])
                n = statistics.median(r[k] for r in seg["new"])
                print(f"  {k:<34} {b:>9.2f} {n:>9.2f} {n - b:>+9.2f}")
        print(f"\nloadavg at the end {os.getloadavg()[0]:.2f}")
    finally:
        for srv, _, _ in servers.values():
            srv.terminate()
            srv.wait(timeout=30)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The wasm tier beside the jail, in one run, through `ringfence serve`'s HTTP API.

Interleaved per round (jail, then wasm, then wasm cold, each a fresh sandbox of
`code-interpreter-v1[@wasm]`):
  1. create -> first `run_code("1+1")` result (POST /v2/sandboxes, then POST /execute until
     the result line); "wasm cold" is the same on a second server started with
     `RINGFENCE_WASM_POOL=0` (no tier pool: every create makes its tmpfs, agent and kernel
     instance; `--no-cold` leaves it out);
  2. `run_code("1+1")` round trip in a live sandbox (to `end_of_execution`);
  2b. the same two for JavaScript (`language="js"`): a live sandbox's first JavaScript cell
      (the context's start), and the round trip;
then, for the wasm tier alone:
  3. host memory per idle instance: the server's RSS (PSS would count shared pages once; the
     compiled module is mapped shared, so RSS over N sandboxes minus RSS before, divided by N,
     bounds what one instance owns) with N sandboxes each holding a context after one cell;
  4. the one-time compile: size of the cached module, and the compile time the server logged
     if it compiled in this run (else the figure is from the cache's first run).

    python3 bench/wasm.py [--rounds 20] [--idle 20] [--bin target/.../release/ringfence]
"""

import argparse
import glob
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from interp import Client, pct  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_pool_refilled(pid, limit=30.0):
    """Waits until the server has no wasm-pool thread (the tier's pool is full again)."""
    end = time.time() + limit
    while time.time() < end:
        names = []
        for t in glob.glob(f"/proc/{pid}/task/*/comm"):
            try:
                names.append(open(t).read().strip())
            except OSError:
                pass
        if "wasm-pool" not in names:
            return True
        time.sleep(0.05)
    return False


def report(name, xs):
    print(f"  {name:<52} median {statistics.median(xs):8.2f} ms   p95 {pct(xs, 95):8.2f} ms   n={len(xs)}")


def start_server(binary, env_extra):
    """A `ringfence serve` on a fresh data directory: (process, port, key, data dir, log)."""
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
    srv = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
                           stdout=log, stderr=log,
                           env=dict(os.environ, RINGFENCE_LOG="info", **env_extra))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return srv, port, key, data, log


def wasm_client(port, key):
    """A client once the server's wasm tier has loaded its module (one create and cell, untimed:
    on a server without a pool this first kernel also makes the tier's kernel image)."""
    c = Client(port, key)
    for _ in range(1200):
        try:
            sid, tok = c.create("code-interpreter-v1@wasm")
            break
        except RuntimeError as e:
            if "loading" not in str(e):
                raise
            c = Client(port, key)
            time.sleep(0.5)
    c.execute(sid, tok, "1+1")
    c.kill(sid)
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--trips", type=int, default=100)
    ap.add_argument("--idle", type=int, default=20)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    ap.add_argument("--no-cold", action="store_true",
                    help="no second server without the tier's pool (no cold-create figure)")
    ap.add_argument("--log", help="copy the server's log here at the end (with RINGFENCE_PHASES=1 "
                    "set, bench/phases.py summarises it)")
    a = ap.parse_args()
    srv, port, key, data, log = start_server(a.bin, {})
    cold = None
    try:
        if not a.no_cold:
            cold = start_server(a.bin, {"RINGFENCE_WASM_POOL": "0"})
        print(f"ringfence serve at 127.0.0.1:{port}; kernel {os.uname().release}; "
              f"nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}")
        # Wait for the wasm tier's module (and the jail's fork server): not timed.
        c = wasm_client(port, key)
        cc = wasm_client(cold[1], cold[2]) if cold else None
        sid, tok = c.create("code-interpreter-v1")
        c.execute(sid, tok, "1+1")
        c.kill(sid)

        first = {"jail": [], "wasm": [], "wasm cold": []}
        trip = {"jail": [], "wasm": []}
        rounds = [("jail", c, "code-interpreter-v1"), ("wasm", c, "code-interpreter-v1@wasm")]
        if cc:
            rounds.append(("wasm cold", cc, "code-interpreter-v1@wasm"))
        for _ in range(a.rounds):
            for tier, cl, tpl in rounds:
                t0 = time.perf_counter()
                sid, tok = cl.create(tpl)
                _, text = cl.execute(sid, tok, "1+1")
                first[tier].append((time.perf_counter() - t0) * 1e3)
                assert text == "2", text
                cl.kill(sid)
        for tier, tpl in (("jail", "code-interpreter-v1"), ("wasm", "code-interpreter-v1@wasm")):
            sid, tok = c.create(tpl)
            c.execute(sid, tok, "1+1")
            for _ in range(a.trips):
                t0 = time.perf_counter()
                c.execute(sid, tok, "1+1")
                trip[tier].append((time.perf_counter() - t0) * 1e3)
            c.kill(sid)
        # JavaScript: a sandbox's first JavaScript cell (its context starts: a QuickJS instance
        # with our kernel script in the wasm tier, a Node kernel in the jail), then round trips.
        js_first = {"jail": [], "wasm": []}
        js_trip = {"jail": [], "wasm": []}
        for _ in range(a.rounds):
            for tier, tpl in (("jail", "code-interpreter-v1"), ("wasm", "code-interpreter-v1@wasm")):
                sid, tok = c.create(tpl)
                t0 = time.perf_counter()
                _, text = c.execute(sid, tok, "1+1", language="js")
                js_first[tier].append((time.perf_counter() - t0) * 1e3)
                assert text == "2", text
                c.kill(sid)
        for tier, tpl in (("jail", "code-interpreter-v1"), ("wasm", "code-interpreter-v1@wasm")):
            sid, tok = c.create(tpl)
            c.execute(sid, tok, "1+1", language="js")
            for _ in range(a.trips):
                t0 = time.perf_counter()
                c.execute(sid, tok, "1+1", language="js")
                js_trip[tier].append((time.perf_counter() - t0) * 1e3)
            c.kill(sid)
        pool = os.environ.get('RINGFENCE_WASM_POOL', '2')
        print(f"create -> first run_code('1+1') result (jail: no pool; wasm: tier pool of {pool}):")
        for tier in ("jail", "wasm"):
            report(tier, first[tier])
        if cc:
            report("wasm cold (a second server, RINGFENCE_WASM_POOL=0)", first["wasm cold"])
        print("run_code('1+1') round trip:")
        for tier in ("jail", "wasm"):
            report(tier, trip[tier])
        print("JavaScript: a live sandbox's first run_code('1+1', language='js') (context start):")
        for tier in ("jail", "wasm"):
            report(tier, js_first[tier])
        print("JavaScript: run_code('1+1', language='js') round trip:")
        for tier in ("jail", "wasm"):
            report(tier, js_trip[tier])

        # Both readings with the tier's pool full (it refills in the background, later and
        # at a low priority since a create takes from it), so the delta is the held sandboxes.
        wait_pool_refilled(srv.pid)
        before = rss_kib(srv.pid)
        held = []
        for _ in range(a.idle):
            sid, tok = c.create("code-interpreter-v1@wasm")
            c.execute(sid, tok, "1+1")
            held.append(sid)
        time.sleep(1)
        wait_pool_refilled(srv.pid)
        after = rss_kib(srv.pid)
        per = (after - before) / a.idle / 1024
        print(f"wasm: server RSS +{(after - before) / 1024:.1f} MiB for {a.idle} idle sandboxes "
              f"(one context each, after one cell): {per:.2f} MiB per instance")
        for sid in held:
            c.kill(sid)
        for f in glob.glob("/var/cache/ringfence/wasm/*.cwasm"):
            print(f"compiled module: {f} {os.path.getsize(f) / 1e6:.0f} MB")
        print(f"loadavg at the end {os.getloadavg()[0]:.2f}")
        log.flush()
        with open(os.path.join(data, "serve.log")) as f:
            for line in f:
                if "wasm tier ready" in line or "kernel image is made" in line:
                    print("server: " + line.strip()[:300])
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        if cold:
            cold[0].terminate()
            cold[0].wait(timeout=30)
        if a.log:
            log.flush()
            subprocess.run(["cp", os.path.join(data, "serve.log"), a.log], check=False)


if __name__ == "__main__":
    main()

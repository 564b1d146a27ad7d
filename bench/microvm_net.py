#!/usr/bin/env python3
"""Egress through the sandbox network path, microvm beside the jail in one run: the round trip
of a small HTTP request (curl's connect time and total time) and a download's throughput, from
inside a sandbox of each tier, through the unmodified `e2b` SDK against a running server.

The target is an HTTP server this script starts on one of the host's own addresses, which the
server's ceiling refuses unless exempted, so run the server with that address exempt:

    ringfence serve --egress-exempt 10.1.2.3/32 ...        # the host's address
    E2B_API_URL=http://127.0.0.1:PORT E2B_SANDBOX_URL=http://127.0.0.1:PORT E2B_API_KEY=KEY \\
        .venv/bin/python bench/microvm_net.py --host 10.1.2.3 [--mib 32] [--rounds 10]

Jail: TUN -> smoltcp -> policy -> relay. microvm: guest virtio-net -> QEMU (`-netdev dgram`)
-> Ethernet adapter -> the same stack. Under TCG the guest's own network stack and driver
run translated, which is what the difference shows (see docs/PERFORMANCE.md).
"""

import argparse
import http.server
import os
import statistics
import tempfile
import threading

from e2b import Sandbox


def serve(host, mib):
    d = tempfile.mkdtemp(prefix="ringfence-netbench-")
    with open(os.path.join(d, "blob"), "wb") as f:
        f.write(os.urandom(mib << 20))
    with open(os.path.join(d, "small"), "w") as f:
        f.write("ok\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=d, **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((host, 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def measure(template, base, rounds, mib):
    s = Sandbox.create(template=template, timeout=600)
    try:
        fmt = "%{time_connect} %{time_total}\\n"
        script = f"for i in $(seq {rounds}); do curl -s -o /dev/null -w '{fmt}' {base}/small; done"
        r = s.commands.run(script, timeout=600)
        rows = [tuple(float(x) for x in l.split()) for l in r.stdout.split("\n") if l.strip()]
        connect = statistics.median(c for c, _ in rows) * 1000
        total = statistics.median(t for _, t in rows) * 1000
        r = s.commands.run(
            f"curl -s -o /dev/null -w '%{{time_total}} %{{size_download}}' {base}/blob",
            timeout=600,
        )
        secs, size = (float(x) for x in r.stdout.split())
        assert int(size) == mib << 20, r.stdout
        return connect, total, size / secs / (1 << 20)
    finally:
        s.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True, help="a host address the server exempts")
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    srv = serve(a.host, a.mib)
    base = f"http://{a.host}:{srv.server_address[1]}"
    print("| tier | connect (median) | small GET total (median) | download |")
    print("|---|---|---|---|")
    for template in ("base", "base@microvm"):
        c, t, mbs = measure(template, base, a.rounds, a.mib)
        print(f"| {template} | {c:.1f} ms | {t:.1f} ms | {mbs:.1f} MiB/s ({a.mib} MiB) |")


if __name__ == "__main__":
    main()

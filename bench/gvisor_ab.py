#!/usr/bin/env python3
"""Two builds and bare runsc, one interleaved run: create -> first output of `/bin/echo` on
the gvisor tier (cold and pool hit), the jail beside it, and gVisor's own floor.

Four servers on loopback: build A and build B, each once without pools (cold starts) and once
with `--pool base=2 --pool base@gvisor=2` (pool hits). Every round measures, in an order that
alternates between A-first and B-first:
  - bare `runsc run` of a bundle of the same root with `/bin/echo` as init, to its first byte
    (bench/tiers.py's floor: no user namespace, cgroup, limits or capabilities);
  - bare `runsc run` of the same bundle as ours (a gvisor sandbox's own `config.json`, with
    `/bin/echo` as init instead of the agent, its root the template's skeleton read-only
    instead of the overlay, no reconnect directory, a cgroup of its own) with the same runsc
    flags as ours: the issue's floor;
  - for each build: create -> first output of `/bin/echo hi` started by envd (no shell), on
    `base@gvisor` and `base`, cold and from the pool.
Prints per-build medians, B's change against A, and each gvisor row over the floor.

    python3 bench/gvisor_ab.py --a OLD/ringfence --b NEW/ringfence [--rounds 12]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from tiers import RUNSC, Server, bare_runsc, first_output_echo, med  # noqa: E402

POOLS = ["--pool", "base=2", "--pool", "base@gvisor=2"]
ROWS = [("gvisor", "cold"), ("gvisor", "pool"), ("jail", "cold"), ("jail", "pool")]
TEMPLATE = {"gvisor": "base@gvisor", "jail": "base"}


def same_bundle(config, template_root):
    """Our sandbox's bundle, turned into the floor's: echo as init, the skeleton as root."""
    cfg = json.loads(json.dumps(config))
    cfg["process"]["args"] = ["/bin/echo", "first"]
    cfg["root"] = {"path": template_root, "readonly": True}
    cfg["mounts"] = [m for m in cfg["mounts"] if not m["destination"].startswith("/dev/.ringfence")]
    return cfg


def bare_same_bundle(cfg, state, n):
    bundle = tempfile.mkdtemp()
    cid = f"bench-floor-{os.getpid()}-{n}"
    cfg = dict(cfg, linux=dict(cfg["linux"], cgroupsPath=f"/ringfence-bench/{cid}"))
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(cfg, f)
    t0 = time.perf_counter()
    p = subprocess.Popen([RUNSC, f"--root={state}", "--platform=systrap", "--network=none",
                          "--overlay2=none", "--host-uds=create", "run", "--bundle", bundle, cid],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = p.stdout.read(1)
    took = (time.perf_counter() - t0) * 1e3
    p.wait()
    subprocess.run([RUNSC, f"--root={state}", "delete", "--force", cid], capture_output=True)
    shutil.rmtree(bundle, ignore_errors=True)
    if first != b"f":
        raise RuntimeError(f"bare runsc (same bundle): {first!r} {p.stderr.read()[:300]!r}")
    return took


def median_interval(xs, level=0.90):
    """A distribution-free interval for the median of sorted `xs`: the order statistics
    (k, n-1-k) with the largest k whose binomial coverage is at least `level`."""
    from math import comb
    n = len(xs)
    if n < 6:
        return xs[0], xs[-1]
    best = 0
    for k in range(n // 2):
        # P(X < k+1 or X > n-k-1) for X ~ Binomial(n, 1/2): outside the interval's ranks.
        tail = sum(comb(n, i) for i in range(k + 1)) / 2 ** n
        if 1 - 2 * tail >= level:
            best = k + 1
        else:
            break
    return xs[best - 1] if best else xs[0], xs[n - best] if best else xs[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="build A's ringfence binary")
    ap.add_argument("--b", required=True, help="build B's ringfence binary")
    ap.add_argument("--rounds", type=int, default=12)
    # Idle gVisor sandboxes are not idle on the host: each pooled one's sentry takes a few
    # per cent of a core (5 % each measured on the 2-core dev VM), and four pools of two run
    # beside every measurement. The cold rows, the floors and their difference need none.
    ap.add_argument("--cold-only", action="store_true",
                    help="no pool servers: only the cold rows and the floors")
    a = ap.parse_args()
    rows = [r for r in ROWS if r[1] == "cold"] if a.cold_only else ROWS
    if not os.access(RUNSC, os.X_OK):
        print(f"SKIPPED bench/gvisor_ab.py: no {RUNSC} (scripts/install-runsc.sh)")
        return
    servers = {}
    state = tempfile.mkdtemp()
    try:
        for build, binary in (("A", a.a), ("B", a.b)):
            servers[(build, "cold")] = Server(binary, [])
            if not a.cold_only:
                servers[(build, "pool")] = Server(binary, POOLS)
        clients = {k: s.client() for k, s in servers.items()}
        for build in ("A", "B"):  # warm-up: templates built, gVisor probed
            for t in TEMPLATE.values():
                first_output_echo(clients[(build, "cold")], t)
        template_root = os.path.join(servers[("A", "cold")].data, "templates", "host", "rootfs")
        # A live gvisor sandbox's bundle, for the same-bundle floor.
        cb = clients[("B", "cold")]
        sid, _ = cb.create_on("base@gvisor")
        path = os.path.join(servers[("B", "cold")].data, "run", "gvisor", "sandboxes", sid,
                            "config.json")
        with open(path) as f:
            ours = same_bundle(json.load(f), template_root)
        cb.kill(sid)
        res = {"floor": [], "floor same bundle": []}
        for build in ("A", "B"):
            for tier, kind in rows:
                res[(build, tier, kind)] = []
        for r in range(a.rounds):
            time.sleep(0.5 if a.cold_only else 2.0)  # lets the pools (two per tier) refill
            res["floor"].append(bare_runsc(template_root, state))
            res["floor same bundle"].append(bare_same_bundle(ours, state, r))
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for tier, kind in rows:
                for build in order:
                    ms = first_output_echo(clients[(build, kind)], TEMPLATE[tier])
                    res[(build, tier, kind)].append(ms)
        print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; "
              f"loadavg {os.getloadavg()[0]:.2f}; rounds {a.rounds}, interleaved")
        print(f"A = {a.a}\nB = {a.b}")
        floor = med(res["floor"])
        print(f"{'create -> first output of /bin/echo (median ms)':<50} {'A':>8} {'B':>8} {'B-A':>8}")
        for tier, kind in rows:
            va, vb = med(res[("A", tier, kind)]), med(res[("B", tier, kind)])
            print(f"{tier + ', ' + kind:<50} {va:>8.1f} {vb:>8.1f} {vb - va:>+8.1f}")
        same = med(res["floor same bundle"])
        print(f"{'floor: bare runsc run -> first byte':<50} {floor:>8.1f}")
        print(f"{'floor: the same, our bundle and flags':<50} {same:>8.1f}")
        for build in ("A", "B"):
            cold = med(res[(build, "gvisor", "cold")])
            print(f"{build}: gvisor cold over the floor {cold - floor:.1f} ms, "
                  f"over the same-bundle floor {cold - same:.1f} ms")
            # Paired: each round's cold start less the same round's same-bundle floor, so
            # that the host's drift from round to round cancels; with a 90 % interval for
            # the median from the order statistics (binomial, no distribution assumed).
            diffs = sorted(x - f for x, f in zip(res[(build, "gvisor", "cold")],
                                                 res["floor same bundle"]))
            lo, hi = median_interval(diffs)
            print(f"{build}: paired, cold less the same round's same-bundle floor: median "
                  f"{med(diffs):.1f} ms (90 % interval {lo:.1f} .. {hi:.1f}), n={len(diffs)}")
        for k, xs in res.items():
            name = k if isinstance(k, str) else " ".join(k)
            print(f"{name} (ms, every round): " + " ".join(f"{x:.1f}" for x in xs))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()

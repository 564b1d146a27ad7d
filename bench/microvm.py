#!/usr/bin/env python3
"""The microvm tier beside the jail, in one run, through the same `ringfence serve` API.

Two servers on loopback (same binary, fresh data dirs): A without pools (cold starts), B with
`--pool base@microvm=1` (pool hits). Rounds interleave every measurement, so host drift hits
all alike:
  - create -> first output of `echo` (raw HTTP, as bench/api.py): jail cold, microvm cold,
    microvm pool hit;
  - memory per idle sandbox, from `GET /sandboxes/{id}/metrics`: the jail's cgroup; for
    microvm the QEMU process's RSS (guest RAM it touched plus the VMM's own);
  - the probe's mode (kvm or tcg) as `GET /tiers` reports it.

Run it on a KVM host as is: the probe picks KVM there, and the table says which mode it ran.

    python3 bench/microvm.py [--rounds 5] [--bin target/x86_64-unknown-linux-gnu/release/ringfence]
"""

import argparse
import json
import os
import time

from tiers import Server, first_output, med


def mode(c):
    c.conn.request("GET", "/tiers", headers={"X-API-Key": c.key})
    r = c.conn.getresponse()
    tiers = json.loads(r.read())["tiers"]
    mvm = [t for t in tiers if t["tier"] == "microvm"][0]
    if not mvm["available"]:
        return None, mvm.get("reason")
    return mvm["capabilities"].get("accel"), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    a = ap.parse_args()
    cold = Server(a.bin, [])
    pooled = Server(a.bin, ["--pool", "base@microvm=1"])
    try:
        ca, cb = cold.client(), pooled.client()
        first_output(ca, "base")
        try:
            first_output(ca, "base@microvm")  # warm-up: probe done, template image built
        except RuntimeError as e:
            print(f"SKIPPED bench/microvm.py: {e}")
            return
        accel, _ = mode(ca)
        res = {k: [] for k in ("jail cold", "microvm cold", "microvm pool")}
        pool_errors = []
        for _ in range(a.rounds):
            time.sleep(6.0)  # lets B's pool boot its replacement (a TCG boot is seconds)
            res["jail cold"].append(first_output(ca, "base"))
            res["microvm cold"].append(first_output(ca, "base@microvm"))
            try:
                res["microvm pool"].append(first_output(cb, "base@microvm"))
            except RuntimeError as e:
                pool_errors.append(str(e))
        mem = {"jail": [], "microvm": []}
        live = []
        for _ in range(2):
            for tier, t in (("jail", "base"), ("microvm", "base@microvm")):
                sid, token = ca.create_on(t)
                live.append(sid)
                ca.run(sid, token, "true")
                time.sleep(1.5)
                m = ca.metrics(sid)
                if m.get("memUsed"):
                    mem[tier].append(m["memUsed"] / 2**20)
        for sid in live:
            ca.kill(sid)
        print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}; "
              f"rounds {a.rounds}, interleaved; microvm accel {accel}; binary {a.bin}")
        print(f"{'measurement':<50} {'median':>10}")
        rows = [
            ("jail: create -> first output, cold (ms)", med(res["jail cold"])),
            (f"microvm ({accel}): create -> first output, cold (ms)", med(res["microvm cold"])),
            (f"microvm ({accel}): create -> first output, pool hit (ms)", med(res["microvm pool"])),
            ("jail: memory per idle sandbox (MiB)", med(mem["jail"])),
            ("microvm: QEMU RSS per idle sandbox (MiB)", med(mem["microvm"])),
        ]
        for name, v in rows:
            print(f"{name:<50} {v:>10.1f}")
        print("raw:", json.dumps({k: [round(x, 1) for x in v] for k, v in res.items()}))
        if pool_errors:
            print(f"pool errors ({len(pool_errors)}):", pool_errors[0][:300])
    finally:
        cold.stop()
        pooled.stop()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The microvm tier beside the jail, in one run, through the same `ringfence serve` API.

Three servers on loopback (same binary, fresh data dirs):
  - "boot": RINGFENCE_MICROVM_SNAPSHOTS=off, every microvm sandbox boots its guest;
  - "restore": the default, every microvm sandbox is restored from the template's memory
    snapshot (built by the warm-up create);
  - "pool": `--pool base@microvm=1`, creates take a pooled guest.
Rounds interleave every measurement, so host drift hits all alike:
  - create -> first output of `echo` (raw HTTP, as bench/api.py): jail cold, microvm boot,
    microvm restore, microvm pool hit;
  - memory per idle sandbox, from `GET /sandboxes/{id}/metrics`: the jail's cgroup; for
    microvm the QEMU process's RSS (guest RAM it touched plus the VMM's own), booted and
    restored;
  - the probe's mode (kvm or tcg) as `GET /tiers` reports it.

Runs as is on a KVM host: the probe picks KVM there (RINGFENCE_MICROVM_ACCEL=kvm forces it,
=tcg forces TCG), and the output starts with the machine the numbers belong to (CPU model,
kernel, whether /dev/kvm opens, QEMU's version, the binary's profile, load).

    python3 bench/microvm.py [--rounds 5] [--bin target/x86_64-unknown-linux-gnu/release/ringfence]
"""

import argparse
import json
import os
import platform
import subprocess
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


def machine(binary):
    """What the numbers were taken on."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        with open("/dev/kvm", "rb"):
            kvm = "opens"
    except OSError as e:
        kvm = f"does not open ({e.strerror})"
    try:
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        qemu = "qemu-system-x86_64 not found"
    profile = "release" if "/release/" in binary else "debug" if "/debug/" in binary else "?"
    return (f"cpu {cpu}; {os.cpu_count()} cpus; kernel {platform.release()}; /dev/kvm {kvm}; "
            f"{qemu}; binary {binary} ({profile}); loadavg {os.getloadavg()[0]:.2f} at start")


def rss(c, template, into):
    sid, token = c.create_on(template)
    c.run(sid, token, "true")
    time.sleep(1.5)
    m = c.metrics(sid)
    if m.get("memUsed"):
        into.append(m["memUsed"] / 2**20)
    return sid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    a = ap.parse_args()
    print(machine(a.bin), flush=True)
    boot = Server(a.bin, [], env={"RINGFENCE_MICROVM_SNAPSHOTS": "off"})
    restore = Server(a.bin, [])
    pooled = Server(a.bin, ["--pool", "base@microvm=1"])
    try:
        cb, cr, cp = boot.client(), restore.client(), pooled.client()
        first_output(cb, "base")
        try:
            # Warm-up: the probe done, the template image built, the snapshot made.
            first_output(cb, "base@microvm")
            first_output(cr, "base@microvm")
        except RuntimeError as e:
            print(f"SKIPPED bench/microvm.py: {e}")
            return
        accel, _ = mode(cb)
        keys = ("jail cold", "microvm boot", "microvm restore", "microvm pool")
        res = {k: [] for k in keys}
        pool_errors = []
        for _ in range(a.rounds):
            time.sleep(6.0)  # lets the pool start its replacement (seconds under TCG)
            res["jail cold"].append(first_output(cb, "base"))
            res["microvm boot"].append(first_output(cb, "base@microvm"))
            res["microvm restore"].append(first_output(cr, "base@microvm"))
            try:
                res["microvm pool"].append(first_output(cp, "base@microvm"))
            except RuntimeError as e:
                pool_errors.append(str(e))
        mem = {"jail": [], "microvm boot": [], "microvm restore": []}
        live = []
        for _ in range(2):
            live.append((cb, rss(cb, "base", mem["jail"])))
            live.append((cb, rss(cb, "base@microvm", mem["microvm boot"])))
            live.append((cr, rss(cr, "base@microvm", mem["microvm restore"])))
        for c, sid in live:
            c.kill(sid)
        print(f"rounds {a.rounds}, interleaved; microvm accel {accel}; "
              f"loadavg {os.getloadavg()[0]:.2f} at end")
        print(f"{'measurement':<58} {'median':>10}")
        rows = [
            ("jail: create -> first output, cold (ms)", med(res["jail cold"])),
            (f"microvm ({accel}): create -> first output, boot (ms)", med(res["microvm boot"])),
            (f"microvm ({accel}): create -> first output, restore (ms)",
             med(res["microvm restore"])),
            (f"microvm ({accel}): create -> first output, pool hit (ms)",
             med(res["microvm pool"])),
            ("jail: memory per idle sandbox (MiB)", med(mem["jail"])),
            ("microvm: QEMU RSS per idle sandbox, booted (MiB)", med(mem["microvm boot"])),
            ("microvm: QEMU RSS per idle sandbox, restored (MiB)", med(mem["microvm restore"])),
        ]
        for name, v in rows:
            print(f"{name:<58} {v:>10.1f}")
        print("raw:", json.dumps({k: [round(x, 1) for x in v] for k, v in res.items()}))
        if pool_errors:
            print(f"pool errors ({len(pool_errors)}):", pool_errors[0][:300])
    finally:
        boot.stop()
        restore.stop()
        pooled.stop()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How long the server takes to start QEMU (the `spawn_us` of `ringfence_microvm`'s debug
line "qemu started"), two builds side by side: servers of A and B alternate, each makes the
template's snapshot with one create (its first QEMU start is left out), then 4 creates of
`base@microvm` (create -> first output of `echo`, killed). Prints the medians of both.

    python3 bench/microvm_spawn.py A/ringfence B/ringfence [rounds]
"""
import os
import re
import statistics
import sys

from tiers import Server, first_output

bins = {"A": sys.argv[1], "B": sys.argv[2]}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
per = 4
got = {"A": [], "B": []}
e2e = {"A": [], "B": []}
for r in range(rounds):
    for name in (["A", "B"] if r % 2 == 0 else ["B", "A"]):
        s = Server(bins[name], [], env={"RINGFENCE_LOG": "warn,ringfence_microvm=debug"})
        try:
            c = s.client()
            first_output(c, "base@microvm")  # warm-up: the template's snapshot
            for _ in range(per):
                e2e[name].append(first_output(c, "base@microvm"))
            log = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(s.data, "serve.log")).read())
            us = [int(x) for x in re.findall(r"spawn_us=(\d+)", log)][1:]
            got[name].extend(us)
        finally:
            s.stop()
for name in "AB":
    v = got[name]
    print(name, bins[name], "spawn ms: n", len(v), "median %.2f" % (statistics.median(v) / 1000),
          "min %.2f max %.2f" % (min(v) / 1000, max(v) / 1000),
          "| create->first output median %.0f ms" % statistics.median(e2e[name]))

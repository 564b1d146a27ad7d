"""What sandbox disks cost `ringfence run -- /bin/true`: the tmpfs and image backends of one
binary, interleaved. Usage: python3 bench/disk.py RINGFENCE_BINARY RUNS (needs root)."""

import json
import statistics
import subprocess
import sys
import time

B = sys.argv[1]
R = int(sys.argv[2])
res = {"tmpfs": [], "image": []}
ph = {"tmpfs": {}, "image": {}}
for i in range(R + 5):
    order = ["tmpfs", "image"] if i % 2 == 0 else ["image", "tmpfs"]
    for b in order:
        rep = f"/tmp/bd-{b}.json"
        t = time.perf_counter_ns()
        p = subprocess.run([B, "run", "-q", "--disk-backend", b, "--report", rep, "--", "/bin/true"])
        dt = (time.perf_counter_ns() - t) / 1e6
        assert p.returncode == 0
        if i < 5:
            continue
        res[b].append(dt)
        r = json.load(open(rep))
        prev = 0.0
        for name, ms in r["phases_ms"]:
            ph[b].setdefault(name, []).append(ms - prev)
            prev = ms
        ph[b].setdefault("report total_ms", []).append(r["total_ms"])
def q(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(p * len(v)))]
for b in res:
    print(f"{b}: wall median {statistics.median(res[b]):.2f} ms p95 {q(res[b], .95):.2f} ms (n={len(res[b])})")
names = list(ph["image"].keys())
for n in names:
    a = ph["tmpfs"].get(n); c = ph["image"][n]
    print(f"  {n:28s} tmpfs {statistics.median(a) if a else float('nan'):7.3f}  image {statistics.median(c):7.3f}")

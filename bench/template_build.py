#!/usr/bin/env python3
"""A template build through the API with E2B's unmodified Template SDK: cold (`skip_cache`,
every step rebuilt, N times) against unchanged (every step cached, N times after one untimed
build that fills the cache), wall time of `Template.build` as the caller sees it (request,
upload check, build, polling at the SDK's 0.2 s).

Against a running server (E2B_API_URL, E2B_API_KEY set) that has the busybox base
`rf-busybox` (scripts/conformance.sh builds it; so does the command in docs/PERFORMANCE.md).

    python3 bench/template_build.py [--runs 5] [--big-mib 4]
"""

import argparse
import os
import statistics
import tempfile
import time

from e2b import Template

STEPS = 9  # run_cmd x3, copy x2, set_envs, set_workdir, set_user x2 (as below)


def template(ctx, cold):
    t = Template(file_context_path=ctx)
    t = t.skip_cache() if cold else t
    return (
        t.from_template("rf-busybox")
        .run_cmd("mkdir -p /opt/made && echo built > /opt/made/by-run")
        .copy("app", "/opt/app/")
        .copy("big.bin", "/opt/big.bin")
        .set_envs({"GREETING": "hi"})
        .set_workdir("/opt/app")
        .run_cmd("ls -la /opt/app > /opt/made/listing")
        .set_user("user")
        .run_cmd("id -u > /home/user/uid")
        .set_user("root")
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big-mib", type=int, default=4, help="size of the one large copied file")
    a = ap.parse_args()
    ctx = tempfile.mkdtemp()
    os.makedirs(os.path.join(ctx, "app"))
    for i in range(20):
        with open(os.path.join(ctx, "app", f"f{i}.txt"), "w") as f:
            f.write("x" * 1000 * i)
    with open(os.path.join(ctx, "big.bin"), "wb") as f:
        f.write(os.urandom(a.big_mib << 20))
    name = f"bench-build-{os.getpid()}"
    res = {"cold": [], "cached": []}
    for _ in range(a.runs):
        t0 = time.perf_counter()
        Template.build(template(ctx, True), name)
        res["cold"].append(time.perf_counter() - t0)
    # Once without skip_cache to fill the cache under the ordinary keys, then timed.
    Template.build(template(ctx, False), name)
    for _ in range(a.runs):
        t0 = time.perf_counter()
        Template.build(template(ctx, False), name)
        res["cached"].append(time.perf_counter() - t0)
    for kind, v in res.items():
        print(f"{kind:7s} median {statistics.median(v):.2f}s  min {min(v):.2f}s  "
              f"max {max(v):.2f}s  ({len(v)} runs, {STEPS} SDK steps, {a.big_mib} MiB file)")


if __name__ == "__main__":
    main()

"""Cluster mode's cost (issue 19), on the test's topology (tests/cluster/cluster.py: three etcd
members, three nodes in network namespaces on one bridge):

  1. routing overhead: for each sandbox, a command's first output through its owner vs
     through a non-owner node (interleaved, the SDK's `on_stdout` callback), and create ->
     first output with the create sent to node A, split by whether A kept the sandbox;
  2. creates per second through node A with 8 client threads: three nodes vs node A alone
     (the other two stopped, so placement has one choice).

Usage: bench/cluster.py [SANDBOXES] [ROUNDS]   (default 30 and 5). Needs what the test needs.
"""

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "cluster"))
import cluster as T  # noqa: E402


def ms(xs):
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1000:.2f} ms, p90 {xs[int(len(xs) * 0.9)] * 1000:.2f} ms (n={len(xs)})"


def first_output(sid):
    from e2b import Sandbox

    s = Sandbox.connect(sid)
    t0 = time.perf_counter()
    got = []
    s.commands.run("echo x", on_stdout=lambda _: got.append(time.perf_counter()))
    return got[0] - t0


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    c = T.Cluster(n)
    from e2b import Sandbox

    try:
        c.make_network()
        for i in range(3):
            c.start_etcd(i)
        time.sleep(2)
        c.key = T.sh(T.BIN, "keys", "create", "--name", "bench", "--data-dir", c.data(0)).stdout.split()[-1]
        for i in range(3):
            c.start_node(i)
        for i in range(3):
            c.wait_serving(i)
        index = {name: i for i, name in enumerate(c.names)}

        # create -> first output, creates sent to A
        T.sdk_env(c, 0)
        kept, placed = [], []
        ids = []
        for _ in range(n):
            t0 = time.perf_counter()
            s = Sandbox.create(timeout=600)
            got = []
            s.commands.run("echo x", on_stdout=lambda _: got.append(time.perf_counter()))
            ids.append(s.sandbox_id)
            owner = T.owners(c)[s.sandbox_id]["owner"]
            (kept if owner == "node-a" else placed).append(got[0] - t0)
        print(f"create -> first output via A, A owns it:   {ms(kept)}")
        print(f"create -> first output via A, peer owns it: {ms(placed)}")

        # first output: owner vs non-owner, interleaved
        recs = T.owners(c)
        own, other = [], []
        for _ in range(rounds):
            for sid in ids:
                o = index[recs[sid]["owner"]]
                T.sdk_env(c, o)
                own.append(first_output(sid))
                T.sdk_env(c, (o + 1) % 3)
                other.append(first_output(sid))
        print(f"first output through the owner:     {ms(own)}")
        print(f"first output through a non-owner:   {ms(other)}")
        print(
            f"routing adds (median difference):   "
            f"{(statistics.median(other) - statistics.median(own)) * 1000:.2f} ms"
        )
        for sid in ids:
            T.sdk_env(c, 0)
            Sandbox.kill(sid)

        # creates/s through A: three nodes, then A alone
        def burst(label):
            T.sdk_env(c, 0)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as ex:
                made = list(ex.map(lambda _: Sandbox.create(timeout=600).sandbox_id, range(n)))
            took = time.perf_counter() - t0
            print(f"creates/s through A, {label}: {n / took:.2f} ({n} in {took:.1f} s)")
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(Sandbox.kill, made))

        burst("three nodes")
        for i in (1, 2):
            c.nodes[i].terminate()
            c.nodes[i].wait(timeout=60)
        time.sleep(T.TTL + 1)  # their registrations gone
        burst("node A alone")
    finally:
        c.close()


if __name__ == "__main__":
    main()

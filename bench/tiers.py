#!/usr/bin/env python3
"""Tiers side by side, in one run: the jail and gVisor through the same `ringfence serve` API.

Two release servers on loopback (same binary, fresh data dirs): A without pools (cold starts),
B with `--pool base=2 --pool base@gvisor=2` (pool hits). Rounds interleave every measurement,
so host drift hits all alike:
  - create -> first output of `bash -l -c 'echo hi'` (raw HTTP, as bench/api.py), cold (A)
    and pool hit (B), for each tier;
  - the create call alone (POST /v2/sandboxes -> 201), cold and pool hit: "pool-hit create"
    in the issue's target is this call;
  - create -> first output of `/bin/echo` run directly (no shell), cold and pool hit, for each
    tier: like for like with the bare floor below, which runs `/bin/echo` as init;
  - bare `runsc run` of a bundle of the same root (the host skeleton, `/usr` bound read-only,
    `/bin/echo` as init, no agent): gVisor's own floor, which our gvisor start sits on;
  - a Python import workload in each tier (`python3 -c "import json, decimal, email.parser,
    http.client, xml.dom.minidom, sqlite3"`, wall time inside via the command's own clock):
    where gVisor's per-syscall cost shows;
  - memory per idle sandbox (the sandbox's cgroup after start-up: the agent for the jail,
    sentry + gofer + agent for gVisor), from `GET /sandboxes/{id}/metrics`.

    python3 bench/tiers.py [--rounds 15] [--bin target/x86_64-unknown-linux-gnu/release/ringfence]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from api import Client  # noqa: E402

RUNSC = "/usr/local/lib/ringfence/runsc"
IMPORTS = "import json, decimal, email.parser, http.client, xml.dom.minidom, sqlite3"


class TierClient(Client):
    def create_on(self, template):
        self.conn.request("POST", "/v2/sandboxes", body=json.dumps({"templateID": template}),
                          headers={"X-API-Key": self.key, "Content-Type": "application/json"})
        r = self.conn.getresponse()
        body = json.loads(r.read())
        if r.status != 201:
            raise RuntimeError(f"create {template}: {r.status} {body}")
        return body["sandboxID"], body["envdAccessToken"]

    def metrics(self, sid):
        self.conn.request("GET", f"/sandboxes/{sid}/metrics", headers={"X-API-Key": self.key})
        r = self.conn.getresponse()
        body = json.loads(r.read())
        return body[-1] if isinstance(body, list) and body else body


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, binary, extra, env=None):
        self.data = tempfile.mkdtemp()
        os.chmod(self.data, 0o755)
        self.port = free_port()
        self.key = subprocess.run(
            [binary, "keys", "create", "--name", "bench", "--data-dir", self.data,
             "--max-sandboxes", "0", "--create-rate", "0"],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        log = open(os.path.join(self.data, "serve.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.data,
             "--run-dir", os.path.join(self.data, "run"), *extra],
            stdout=log, stderr=log, env=dict(os.environ, **{"RINGFENCE_LOG": "warn", **(env or {})}))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not come up")

    def client(self):
        return TierClient(self.port, self.key)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.data, ignore_errors=True)


def first_output(c, template, created=None):
    """create -> first output of bash's echo; `created` gets the create call's own time."""
    t0 = time.perf_counter()
    sid, token = c.create_on(template)
    if created is not None:
        created.append((time.perf_counter() - t0) * 1e3)
    t_first = c.first_output(sid, token)
    c.kill(sid)
    return (t_first - t0) * 1e3


def first_output_echo(c, template):
    """create -> first output of `/bin/echo hi` started by envd directly (no shell)."""
    t0 = time.perf_counter()
    sid, token = c.create_on(template)
    t_first = c.first_output(sid, token, cmd="/bin/echo", args=["hi"])
    c.kill(sid)
    return (t_first - t0) * 1e3


def bare_runsc(template_root, state):
    """`runsc run` of a bundle of the host skeleton with /usr bound, /bin/echo as init."""
    bundle = tempfile.mkdtemp()
    cid = f"bench-bare-{os.getpid()}-{time.monotonic_ns()}"
    cfg = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["/bin/echo", "first"],
                    "env": ["PATH=/usr/bin:/bin"], "cwd": "/", "noNewPrivileges": True},
        "root": {"path": template_root, "readonly": True},
        "hostname": "bare",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/usr", "type": "bind", "source": "/usr",
                    "options": ["rbind", "ro", "nosuid", "nodev"]},
                   {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
    }
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(cfg, f)
    t0 = time.perf_counter()
    p = subprocess.Popen([RUNSC, f"--root={state}", "--platform=systrap", "--network=none",
                          "--overlay2=none", "run", "--bundle", bundle, cid],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = p.stdout.read(1)
    took = (time.perf_counter() - t0) * 1e3
    p.wait()
    subprocess.run([RUNSC, f"--root={state}", "delete", "--force", cid], capture_output=True)
    shutil.rmtree(bundle, ignore_errors=True)
    if first != b"f":
        raise RuntimeError(f"bare runsc: {first!r} {p.stderr.read()[:300]!r}")
    return took


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    a = ap.parse_args()
    if not os.access(RUNSC, os.X_OK):
        print(f"SKIPPED bench/tiers.py: no {RUNSC} (scripts/install-runsc.sh)")
        return
    cold = Server(a.bin, [])
    pooled = Server(a.bin, ["--pool", "base=2", "--pool", "base@gvisor=2"])
    state = tempfile.mkdtemp()
    try:
        ca, cb = cold.client(), pooled.client()
        for t in ("base", "base@gvisor"):  # warm-up: templates built, gVisor probed
            first_output(ca, t)
        template_root = os.path.join(cold.data, "templates", "host", "rootfs")
        res = {k: [] for k in ("jail cold", "gvisor cold", "jail pool", "gvisor pool", "runsc bare",
                               "jail imports", "gvisor imports", "jail create cold",
                               "gvisor create cold", "jail create pool", "gvisor create pool",
                               "jail echo cold", "gvisor echo cold", "jail echo pool",
                               "gvisor echo pool")}
        for _ in range(a.rounds):
            time.sleep(2.0)  # lets B's pools (two per tier, two takes per round) refill
            res["jail cold"].append(first_output(ca, "base", res["jail create cold"]))
            res["gvisor cold"].append(first_output(ca, "base@gvisor", res["gvisor create cold"]))
            res["jail pool"].append(first_output(cb, "base", res["jail create pool"]))
            res["gvisor pool"].append(first_output(cb, "base@gvisor", res["gvisor create pool"]))
            res["runsc bare"].append(bare_runsc(template_root, state))
            res["jail echo cold"].append(first_output_echo(ca, "base"))
            res["gvisor echo cold"].append(first_output_echo(ca, "base@gvisor"))
            res["jail echo pool"].append(first_output_echo(cb, "base"))
            res["gvisor echo pool"].append(first_output_echo(cb, "base@gvisor"))
        # The import workload and idle memory: a few sandboxes of each tier, side by side.
        mem = {"jail": [], "gvisor": []}
        live = []
        for _ in range(3):
            for tier, t in (("jail", "base"), ("gvisor", "base@gvisor")):
                sid, token = ca.create_on(t)
                live.append(sid)
                cmd = f"python3 -c 'import time; t=time.perf_counter(); {IMPORTS}; print((time.perf_counter()-t)*1e3)'"
                res[f"{tier} imports"].append(float(ca.run(sid, token, cmd).decode().strip()))
                time.sleep(1.5)  # let the sandbox settle before its memory is read
                m = ca.metrics(sid)
                if m.get("memUsed"):
                    mem[tier].append(m["memUsed"] / 2**20)
        for sid in live:
            ca.kill(sid)
        print(f"kernel {os.uname().release}; nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}; "
              f"rounds {a.rounds}, interleaved")
        print(f"{'measurement':<52} {'median':>10}")
        rows = [
            ("jail: create -> first output, cold (ms)", med(res["jail cold"])),
            ("jail: create -> first output, pool hit (ms)", med(res["jail pool"])),
            ("gvisor: create -> first output, cold (ms)", med(res["gvisor cold"])),
            ("gvisor: create -> first output, pool hit (ms)", med(res["gvisor pool"])),
            ("jail: create call alone, cold (ms)", med(res["jail create cold"])),
            ("jail: create call alone, pool hit (ms)", med(res["jail create pool"])),
            ("gvisor: create call alone, cold (ms)", med(res["gvisor create cold"])),
            ("gvisor: create call alone, pool hit (ms)", med(res["gvisor create pool"])),
            ("jail: create -> first output of /bin/echo (ms)", med(res["jail echo cold"])),
            ("gvisor: create -> first output of /bin/echo (ms)", med(res["gvisor echo cold"])),
            ("jail: ... of /bin/echo, pool hit (ms)", med(res["jail echo pool"])),
            ("gvisor: ... of /bin/echo, pool hit (ms)", med(res["gvisor echo pool"])),
            ("gvisor floor: bare runsc run -> first byte (ms)", med(res["runsc bare"])),
            ("gvisor /bin/echo over the bare floor (ms)",
             med(res["gvisor echo cold"]) - med(res["runsc bare"])),
            ("gvisor bash cold over the bare floor (ms)", med(res["gvisor cold"]) - med(res["runsc bare"])),
            ("jail: Python imports inside (ms)", med(res["jail imports"])),
            ("gvisor: Python imports inside (ms)", med(res["gvisor imports"])),
            ("jail: memory per idle sandbox (MiB)", med(mem["jail"])),
            ("gvisor: memory per idle sandbox (MiB)", med(mem["gvisor"])),
        ]
        for name, v in rows:
            print(f"{name:<52} {v:>10.1f}")
        # A pool miss (the pool not refilled in time) shows as a create call of a cold start's
        # length: the raw values say whether the pool rows are all hits.
        for k in ("jail create pool", "gvisor create pool"):
            print(f"{k} (ms, every round): " + " ".join(f"{x:.1f}" for x in res[k]))
    finally:
        cold.stop()
        pooled.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()

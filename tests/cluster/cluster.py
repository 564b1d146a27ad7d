"""Cluster mode end to end (issue 19): three etcd members and three `ringfence serve --cluster`
nodes, each node in its own network namespace on a bridge this test makes, driven with the
unmodified `e2b` SDK.

Scenarios (each prints `ok ...` lines; any failure raises):
  1. N sandboxes created through node A spread over the nodes by capacity; the SDK pointed at
     node B runs a command and reads a file in every one.
  2. `kill -9` of node C (and of one etcd member): within the lease TTL C's sandboxes are
     listed `lost` and calls to them name node C; A and B keep serving; etcd keeps quorum.
     C restarted with the same id adopts its surviving sandboxes.
  3. Node B's link cut: its calls fail fast with an error naming the cause; after the link
     returns no sandbox has two owners, and B serves its sandboxes again.
  4. A rolling restart (kill -9 and start again, one node at a time) loses no acknowledged
     sandbox record.

Usage: cluster.py [N]   (N sandboxes, default $CLUSTER_SANDBOXES or 300)
Needs root, `etcd`/`etcdctl` (Debian's etcd-server/etcd-client), `ip`, and a built
`ringfence` ($RINGFENCE_BIN). Prints SKIPPED and exits 0 when any is missing.
Everything it makes (namespaces, links, processes, directories) is removed, also on failure.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get(
    "RINGFENCE_BIN", os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/ringfence")
)
TTL = 5
PREFIX = "/rftest"
PORT = 3000


def skip(why):
    print(f"SKIPPED: cluster test: {why}")
    sys.exit(0)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok   {name}", flush=True)


def sh(*args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        # What the command said, not only its status: a CI log must name the cause.
        sys.stderr.write(f"command failed ({r.returncode}): {' '.join(map(str, args))}\n"
                         f"{r.stdout[-2000:]}{r.stderr[-4000:]}\n")
        r.check_returncode()
    return r


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Cluster:
    def __init__(self, n_sandboxes):
        self.n = n_sandboxes
        tag = f"rfc{os.getpid() % 100000}"
        self.tag = tag
        self.bridge = f"{tag}br"
        self.net = f"198.18.{random.randrange(0, 256)}"
        self.gw = f"{self.net}.1"
        self.ns = [f"{tag}n{i}" for i in range(3)]
        self.host_if = [f"{tag}h{i}" for i in range(3)]
        self.addr = [f"{self.net}.{10 + i}" for i in range(3)]
        self.names = ["node-a", "node-b", "node-c"]
        self.tmp = tempfile.mkdtemp(prefix="rf-cluster-")
        os.chmod(self.tmp, 0o755)
        self.etcd = [None, None, None]
        self.etcd_client = [free_port() for _ in range(3)]
        self.etcd_peer = [free_port() for _ in range(3)]
        self.nodes = [None, None, None]
        self.made_bridge = False
        self.made_ns = []
        self.key = None

    # ---- network ------------------------------------------------------------------------
    def make_network(self):
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.made_bridge = True
        sh("ip", "addr", "add", f"{self.gw}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(3):
            ns, h = self.ns[i], self.host_if[i]
            sh("ip", "netns", "add", ns)
            self.made_ns.append(ns)
            sh("ip", "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", h, "master", self.bridge)
            sh("ip", "link", "set", h, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr[i]}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", self.gw)

    def cut(self, i):
        sh("ip", "link", "set", self.host_if[i], "down")

    def mend(self, i):
        sh("ip", "link", "set", self.host_if[i], "up")

    # ---- etcd ---------------------------------------------------------------------------
    def etcd_cmd(self, i):
        names = ",".join(
            f"e{j}=http://127.0.0.1:{self.etcd_peer[j]}" for j in range(3)
        )
        return [
            "etcd",
            "--name", f"e{i}",
            "--data-dir", os.path.join(self.tmp, f"etcd{i}"),
            "--listen-client-urls",
            f"http://127.0.0.1:{self.etcd_client[i]},http://{self.gw}:{self.etcd_client[i]}",
            "--advertise-client-urls", f"http://{self.gw}:{self.etcd_client[i]}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer[i]}",
            "--initial-cluster", names,
            "--initial-cluster-token", self.tag,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
        ]

    def start_etcd(self, i):
        log = open(os.path.join(self.tmp, f"etcd{i}.log"), "a")
        self.etcd[i] = subprocess.Popen(self.etcd_cmd(i), stdout=log, stderr=log)

    def endpoints(self, local=False):
        host = "127.0.0.1" if local else self.gw
        return ",".join(f"http://{host}:{p}" for p in self.etcd_client)

    def etcdctl(self, *args):
        # Members still up only: one may be down on purpose.
        up = ",".join(f"http://127.0.0.1:{p}" for j, p in enumerate(self.etcd_client)
                      if self.etcd[j] and self.etcd[j].poll() is None)
        return sh("etcdctl", "--endpoints", up, *args, env=dict(os.environ, ETCDCTL_API="3"))

    def records(self):
        out = self.etcdctl("get", "--prefix", f"{PREFIX}/sandboxes/", "--print-value-only").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # ---- nodes --------------------------------------------------------------------------
    def data(self, i):
        d = os.path.join(self.tmp, f"node{i}")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        return d

    def start_node(self, i):
        log = open(os.path.join(self.tmp, f"node{i}.log"), "a")
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup hierarchy.
        cmd = [
            "nsenter", f"--net=/run/netns/{self.ns[i]}", BIN, "serve",
            "--listen", f"{self.addr[i]}:{PORT}",
            "--data-dir", self.data(i),
            "--run-dir", os.path.join(self.tmp, f"run{i}"),
            "--cluster", self.endpoints(),
            "--node-id", self.names[i],
            "--cluster-ttl", f"{TTL}s",
            "--cluster-prefix", PREFIX,
            "--default-timeout", "900s",
            # Quotas are per node, not cluster-wide (docs/ARCHITECTURE.md): off, so the
            # count is the test's choice.
            "--max-sandboxes-per-key", "0",
            "--create-rate-per-key", "0",
            # A host directory every node's namespace sees: paused sandboxes resumable
            # elsewhere.
            "--shared-snapshots", os.path.join(self.tmp, "shared"),
        ]
        self.nodes[i] = subprocess.Popen(cmd, stdout=log, stderr=log)

    def url(self, i):
        return f"http://{self.addr[i]}:{PORT}"

    def wait_serving(self, i, timeout=60):
        """Until node i answers an authenticated list (registered, reconciled, keys in)."""
        end = time.time() + timeout
        last = None
        while time.time() < end:
            if self.nodes[i].poll() is not None:
                raise AssertionError(f"node {i} exited: {self.tail(i)}")
            try:
                status, _, _ = self.http(i, "GET", "/sandboxes?limit=1", hop=True)
                if status == 200:
                    return
                last = status
            except OSError as e:
                last = e
            time.sleep(0.2)
        raise AssertionError(f"node {i} not serving after {timeout}s ({last}): {self.tail(i)}")

    def tail(self, i):
        try:
            with open(os.path.join(self.tmp, f"node{i}.log")) as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return ""

    def http(self, i, method, path, hop=False, timeout=10, headers=None, data=None):
        req = urllib.request.Request(self.url(i) + path, method=method, data=data)
        req.add_header("X-API-Key", self.key)
        if hop:
            # A peer's hop marker: the node answers for itself only (no fan-out).
            req.add_header("X-Ringfence-Hop", "test")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def kill9(self, i):
        p = self.nodes[i]
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()

    # ---- cleanup ------------------------------------------------------------------------
    def close(self):
        # A node killed on purpose left its sandboxes running: a plain server on its data
        # adopts them, and its SIGTERM below ends them (processes, mounts, cgroups).
        for i, p in enumerate(self.nodes):
            if p and p.poll() is not None:
                log = open(os.path.join(self.tmp, f"node{i}.log"), "a")
                self.nodes[i] = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{self.ns[i]}", BIN, "serve",
                     "--listen", f"{self.addr[i]}:{PORT}", "--data-dir", self.data(i),
                     "--run-dir", os.path.join(self.tmp, f"run{i}")],
                    stdout=log, stderr=log)
                self.mend(i)
                end = time.time() + 30
                while time.time() < end:
                    try:
                        urllib.request.urlopen(self.url(i) + "/health", timeout=1)
                        break
                    except OSError:
                        time.sleep(0.2)
        for p in self.nodes:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.nodes:
            if p:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for p in self.etcd:
            if p and p.poll() is None:
                p.kill()
                p.wait()
        for ns in self.made_ns:
            sh("ip", "netns", "del", ns, check=False)
        for h in self.host_if:
            sh("ip", "link", "del", h, check=False)
        if self.made_bridge:
            sh("ip", "link", "del", self.bridge, check=False)
        if os.environ.get("KEEP_CLUSTER_LOGS"):
            print(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def sdk_env(c, i):
    os.environ["E2B_API_URL"] = c.url(i)
    os.environ["E2B_SANDBOX_URL"] = c.url(i)
    os.environ["E2B_API_KEY"] = c.key
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(c.addr + ["127.0.0.1"])


# A minimal upgrade server (no WebSocket framing: the relay is what is tested): answers 101,
# then echoes each chunk upper-cased.
WS_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8765))
s.listen(4)
while True:
    c, _ = s.accept()
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        d = c.recv(4096)
        if not d:
            break
        buf += d
    c.sendall(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n")
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d.upper())
    c.close()
"""


def upgrade_echo(c, i, sid, port, token):
    """An upgrade request for sandbox `sid`'s port through node i; returns the echo."""
    sock = socket.create_connection((c.addr[i], PORT), timeout=10)
    try:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {port}-{sid}.localhost:3000\r\n"
                      f"X-Access-Token: {token}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            d = sock.recv(4096)
            if not d:
                break
            head += d
        assert head.startswith(b"HTTP/1.1 101"), head[:300]
        sock.sendall(b"hello through a\n")
        out = head.split(b"\r\n\r\n", 1)[1]
        while not out.endswith(b"\n"):
            d = sock.recv(4096)
            if not d:
                break
            out += d
        return out
    finally:
        sock.close()


def owners(c):
    return {r["id"]: r for r in c.records()}


def template_meta(c, name):
    out = c.etcdctl("get", f"{PREFIX}/templates/{name}:latest", "--print-value-only").stdout
    return json.loads(out) if out.strip() else None


def templates(c):
    """Template contents fetched node to node: built on A only, used on B and through C; a
    tampered copy on A is refused by B naming the digest, leaving nothing registered."""
    from e2b import Sandbox

    if not os.path.exists("/bin/busybox"):
        print("SKIPPED: template fetch scenario: no /bin/busybox (busybox-static)")
        return
    ctx = os.path.join(c.tmp, "tpl")
    os.makedirs(ctx, exist_ok=True)
    shutil.copy("/bin/busybox", ctx)
    with open(os.path.join(ctx, "bash"), "w") as f:
        f.write('#!/bin/sh\nexec /bin/sh "$@"\n')
    os.chmod(os.path.join(ctx, "bash"), 0o755)
    tag = f"t{os.getpid()}"

    def build(name, marker):
        with open(os.path.join(ctx, "marker"), "w") as f:
            f.write(marker + "\n")
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write('FROM scratch\nCOPY busybox /bin/busybox\n'
                    'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
                    # The SDK runs commands with `/bin/bash -l -c`: busybox's sh answers.
                    'COPY bash /bin/bash\n'
                    'COPY marker /etc/marker\n')
        # A run directory of its own: the host's default one is shared with any other
        # server on the machine, whose start-up sweep is no business of this build.
        sh(BIN, "template", "build", "--name", name, "-f", os.path.join(ctx, "Dockerfile"),
           "--data-dir", c.data(0), "--run-dir", os.path.join(c.tmp, "run-build"))
        end = time.time() + 20
        while time.time() < end and template_meta(c, name) is None:
            time.sleep(0.3)
        meta = template_meta(c, name)
        check(f"templates: {name} built on A is published with its layer digests",
              meta is not None and meta["origin"] == "node-a"
              and len(meta["content"]) == len(meta["record"]["layers"]), str(meta)[:300])
        return meta

    good = f"{tag}good"
    build(good, f"marker-{tag}")
    stored = lambda i, n: os.path.exists(os.path.join(c.data(i), f"images/templates/{n}:latest.json"))
    check("templates: B does not hold it before a create", not stored(1, good))
    t0 = time.time()
    body = json.dumps({"templateID": good, "timeout": 600}).encode()
    # The hop marker is what a placing node sends: this create runs on B itself.
    status, out, _ = c.http(1, "POST", "/sandboxes", hop=True, data=body, timeout=60,
                            headers={"Content-Type": "application/json"})
    check("templates: a create on B fetches the template from A", status == 201, f"{status} {out[:300]}")
    print(f"     create with fetch on B: {(time.time() - t0) * 1000:.0f} ms")
    sid = json.loads(out)["sandboxID"]
    check("templates: B registered it locally", stored(1, good))
    sdk_env(c, 2)
    r = Sandbox.connect(sid).commands.run("cat /etc/marker")
    check("templates: the sandbox on B (used through C) reads the template's file",
          r.stdout.strip() == f"marker-{tag}", r.stdout)
    made = [sid]
    for _ in range(4):
        s = Sandbox.create(template=good, timeout=600)
        made.append(s.sandbox_id)
        r = s.commands.run("cat /etc/marker")
        assert r.stdout.strip() == f"marker-{tag}", r.stdout
    where = sorted(owners(c)[x]["owner"] for x in made[1:])
    check(f"templates: four SDK creates through C run it wherever placed ({where})", True)

    # Off the public surface: the layer endpoint without a node's signature is a plain 404.
    meta = template_meta(c, good)
    top = meta["record"]["layers"][0]["diff_id"]
    status, _, _ = c.http(0, "GET", f"/_cluster/layers/sha256-{top.split(':')[1]}")
    check("templates: the internal layer endpoint refuses an unsigned request", status == 404,
          str(status))

    bad = f"{tag}bad"
    meta = build(bad, f"other-{tag}")
    top = meta["record"]["layers"][0]["diff_id"]
    want = meta["content"][top]
    layer_dir = os.path.join(c.data(0), "images/layers", top.replace(":", "-"))
    with open(os.path.join(layer_dir, "etc/marker"), "w") as f:
        f.write("tampered\n")
    body = json.dumps({"templateID": bad, "timeout": 600}).encode()
    status, out, _ = c.http(1, "POST", "/sandboxes", hop=True, data=body, timeout=60,
                            headers={"Content-Type": "application/json"})
    msg = json.loads(out).get("message", "") if out else ""
    print(f"     tampered: {status} {msg[:400]}")
    check("templates: a tampered transfer is refused naming the digest",
          status == 502 and want in msg and "digest mismatch" in msg, f"{status} {msg}")
    left = [n for n in os.listdir(os.path.join(c.data(1), "images"))
            if n.startswith(".fetch-")]
    check("templates: nothing of it is registered or kept on B",
          not stored(1, bad) and not os.path.exists(
              os.path.join(c.data(1), "images/layers", top.replace(":", "-"))) and not left,
          str(left))
    for x in made:
        c.http(0, "DELETE", f"/sandboxes/{x}")


def quota(c):
    """A key's sandbox quota holds across the cluster: creates through all three nodes at
    once never take it past its limit."""
    n, tries = 3, 12
    main = c.key
    c.key = sh(BIN, "keys", "create", "--name", "quota", "--max-sandboxes", str(n),
               "--data-dir", c.data(2)).stdout.split()[-1]
    end = time.time() + 15
    while time.time() < end and not all(c.http(i, "GET", "/sandboxes", hop=True)[0] == 200
                                        for i in range(3)):
        time.sleep(0.3)
    body = json.dumps({"templateID": "base", "timeout": 600}).encode()
    hdr = {"Content-Type": "application/json"}

    def create(i):
        return c.http(i % 3, "POST", "/sandboxes", data=body, headers=hdr, timeout=60)

    with ThreadPoolExecutor(tries) as ex:
        res = list(ex.map(create, range(tries)))
    made = [json.loads(b)["sandboxID"] for s, b, _ in res if s == 201]
    refused = [json.loads(b).get("message", "") for s, b, _ in res if s == 429]
    codes = sorted(s for s, _, _ in res)
    print(f"     quota {n}, {tries} creates at once through A, B, C: {codes}")
    check(f"quota: exactly {n} of {tries} concurrent creates through three nodes succeed",
          len(made) == n and len(refused) == tries - n, str(codes))
    check("quota: the refusal names the cluster-wide limit",
          all("across the cluster" in m and f"limit is {n}" in m for m in refused), refused[:1])
    recs = [r for r in c.records() if r["id"] in made]
    check("quota: each admitted sandbox has its record, counted", len(recs) == n
          and all(r.get("counted") for r in recs))
    status, _, _ = c.http(1, "DELETE", f"/sandboxes/{made[0]}")
    idem = dict(hdr, **{"Idempotency-Key": f"quota-{os.getpid()}"})
    status, out, _ = c.http(2, "POST", "/sandboxes", data=body, headers=idem, timeout=60)
    check("quota: a kill gives the unit back (the next create succeeds)", status == 201,
          f"{status} {out[:200]}")
    last = json.loads(out)["sandboxID"]
    made = made[1:] + [last]
    status, _, _ = c.http(0, "POST", "/sandboxes", data=body, headers=hdr, timeout=60)
    check("quota: and the limit holds again after it", status == 429, str(status))
    # At the limit, a retry of a create already made replays it; a new one is still refused.
    status, out, _ = c.http(1, "POST", "/sandboxes", data=body, headers=idem, timeout=60)
    check("quota: at the limit, an Idempotency-Key retry replays its create",
          status == 201 and json.loads(out)["sandboxID"] == last, f"{status} {out[:200]}")
    fresh = dict(hdr, **{"Idempotency-Key": f"quota-new-{os.getpid()}"})
    status, out, _ = c.http(0, "POST", "/sandboxes", data=body, headers=fresh, timeout=60)
    time.sleep(1.5)
    mine = [r for r in c.records() if r.get("tenant") == recs[0]["tenant"]]
    check("quota: at the limit, a new Idempotency-Key create is refused and leaves nothing",
          status == 429 and len(mine) == n, f"{status} {len(mine)} records")
    for x in made:
        c.http(0, "DELETE", f"/sandboxes/{x}")
    c.key = main


def run(c):
    from e2b import Sandbox

    c.make_network()
    for i in range(3):
        c.start_etcd(i)
    deadline = time.time() + 30
    while time.time() < deadline:
        r = sh("etcdctl", "--endpoints", c.endpoints(local=True), "endpoint", "health",
               check=False, env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode == 0:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("etcd cluster did not become healthy")
    check("etcd: three members healthy", True)
    # One key, made on node A's store; the cluster replicates it to B and C.
    c.key = sh(BIN, "keys", "create", "--name", "cluster", "--data-dir", c.data(0)).stdout.split()[-1]
    for i in range(3):
        c.start_node(i)
    for i in range(3):
        c.wait_serving(i)
    check("nodes: three registered and serving (key replicated to B and C)", True)

    # ---- 1. create N through A, use every one through B --------------------------------
    sdk_env(c, 0)
    t0 = time.time()

    def create(_):
        return Sandbox.create(timeout=900).sandbox_id

    with ThreadPoolExecutor(8) as ex:
        ids = list(ex.map(create, range(c.n)))
    took = time.time() - t0
    print(f"     created {c.n} sandboxes through A in {took:.1f} s ({c.n / took:.1f}/s)")
    recs = owners(c)
    check("create: every acknowledged sandbox has one record", all(i in recs for i in ids))
    spread = {name: sum(1 for i in ids if recs[i]["owner"] == name) for name in c.names}
    print(f"     spread: {spread}")
    check(
        "create: spread over all three nodes by capacity",
        all(v >= c.n // 6 for v in spread.values()),
        str(spread),
    )
    sdk_env(c, 1)

    def use(sid):
        s = Sandbox.connect(sid)
        r = s.commands.run(f"echo {sid} > /tmp/who && cat /tmp/who")
        assert r.stdout.strip() == sid, r.stdout
        assert s.files.read("/tmp/who").strip() == sid
        return True

    t0 = time.time()
    with ThreadPoolExecutor(8) as ex:
        used = list(ex.map(use, ids))
    check(f"routing: the SDK at B ran a command and read a file in all {len(used)}", all(used))
    print(f"     in {time.time() - t0:.1f} s")
    status, body, _ = c.http(1, "GET", "/sandboxes?limit=1000")
    listed = {x["sandboxID"] for x in json.loads(body)}
    check("list through B fans out to every node", set(ids) <= listed, f"{len(listed)} listed")
    # Pages across nodes: limit 5 through C, following nextToken, gives each sandbox once,
    # newest first, the same set as the single big page.
    paged, token = [], None
    for _ in range(200):
        q = "/sandboxes?limit=5" + (f"&nextToken={token}" if token else "")
        status, body, hdrs = c.http(2, "GET", q)
        assert status == 200, body
        paged += [x for x in json.loads(body) if x.get("state") != "lost"]
        token = next((v for k, v in hdrs.items() if k.lower() == "x-next-token"), None)
        if not token:
            break
    got = [x["sandboxID"] for x in paged]
    starts = [x["startedAt"] for x in paged]
    check("list pagination across nodes: every sandbox once, newest first",
          len(got) == len(set(got)) and set(got) == listed and starts == sorted(starts, reverse=True),
          f"{len(got)} paged, {len(set(got))} distinct, {len(listed)} listed")

    # A WebSocket-style upgrade to a sandbox's inbound port, through a node that does not own it.
    t_ws = time.time()
    ws_sid = next(i for i in ids if recs[i]["owner"] == "node-c")
    sdk_env(c, 2)
    s = Sandbox.connect(ws_sid)
    s.files.write("/tmp/ws.py", WS_SERVER)
    s.commands.run("python3 /tmp/ws.py", background=True)
    status, out, _ = c.http(2, "POST", f"/sandboxes/{ws_sid}/connect", data=b'{"timeout": 900}',
                            headers={"Content-Type": "application/json"})
    token = json.loads(out).get("envdAccessToken", "")
    reply = b""
    for _ in range(20):
        try:
            reply = upgrade_echo(c, 0, ws_sid, 8765, token)
            break
        except (OSError, AssertionError) as e:
            reply = str(e).encode()
            time.sleep(0.3)
    check("upgrade: a WebSocket-style upgrade through A reaches C's sandbox port both ways",
          reply == b"HELLO THROUGH A\n", repr(reply))
    print(f"     (upgrade scenario: {time.time() - t_ws:.1f} s)")

    # A create retried through another node under the same Idempotency-Key makes no second
    # sandbox; a kill through a third node reaches the owner and drops the record.
    hdr = {"Idempotency-Key": f"cluster-{os.getpid()}", "Content-Type": "application/json"}
    body = b'{"templateID": "base", "timeout": 600}'
    s1, b1, _ = c.http(0, "POST", "/sandboxes", headers=hdr, data=body)
    s2, b2, _ = c.http(1, "POST", "/sandboxes", headers=hdr, data=body)
    first, again = json.loads(b1).get("sandboxID"), json.loads(b2).get("sandboxID")
    check("idempotency: a retry through B returns A's create", s1 == 201 and s2 == 201
          and first == again, f"{s1} {s2} {first} {again}")
    status, _, _ = c.http(2, "DELETE", f"/sandboxes/{first}")
    time.sleep(0.5)
    check("kill through C: 204 and the record is gone", status == 204 and first not in owners(c),
          str(status))

    t0 = time.time()
    templates(c)
    print(f"     (template scenario: {time.time() - t0:.1f} s)")
    t0 = time.time()
    quota(c)
    print(f"     (quota scenario: {time.time() - t0:.1f} s)")
    t_pause = time.time()

    # A sandbox on C paused to its files, which go to the shared directory.
    ct = {"Content-Type": "application/json"}
    status, out, _ = c.http(2, "POST", "/sandboxes", hop=True, headers=ct, timeout=60,
                            data=json.dumps({"templateID": "base", "timeout": 600}).encode())
    psid = json.loads(out)["sandboxID"]
    sdk_env(c, 0)
    Sandbox.connect(psid).files.write("/home/user/kept.txt", f"kept-{psid}")
    status, out, _ = c.http(0, "POST", f"/sandboxes/{psid}/pause", headers=ct,
                            data=b'{"memory": false}', timeout=60)
    check("pause on C (files only, through A)", status == 204, f"{status} {out[:200]}")
    end = time.time() + 15
    while time.time() < end and not owners(c).get(psid, {}).get("snapshot"):
        time.sleep(0.3)
    check("pause on C: its record names its copy on shared storage",
          bool(owners(c).get(psid, {}).get("snapshot")), str(owners(c).get(psid)))
    print(f"     (pause scenario: {time.time() - t_pause:.1f} s)")

    # ---- 2. kill -9 node C and one etcd member -------------------------------------------
    on = {name: [i for i in ids if recs[i]["owner"] == name] for name in c.names}
    killed_at = time.time()
    c.kill9(2)
    lost_after = None
    while time.time() - killed_at < TTL * 3:
        status, body, _ = c.http(0, "GET", "/sandboxes?limit=1000")
        if status == 200:
            states = {x["sandboxID"]: x.get("state") for x in json.loads(body)}
            if all(states.get(i) == "lost" for i in on["node-c"]):
                lost_after = time.time() - killed_at
                break
        time.sleep(0.2)
    check("kill -9 C: its sandboxes listed lost", lost_after is not None)
    print(f"     lost after {lost_after:.2f} s (lease TTL {TTL} s)")
    check(f"kill -9 C: lost within the lease TTL (<= {TTL} s)", lost_after <= TTL)
    status, body, _ = c.http(0, "GET", f"/sandboxes/{on['node-c'][0]}")
    msg = json.loads(body).get("message", "")
    check("kill -9 C: a call to its sandbox names node C", status == 503 and "node-c" in msg, msg)
    # C's paused sandbox: two resumes at once through A and B; one node takes it over.
    t0 = time.time()

    def resume(i):
        return c.http(i, "POST", f"/sandboxes/{psid}/resume", headers=ct, timeout=60,
                      data=b'{"timeout": 600}')

    t0 = time.time()
    with ThreadPoolExecutor(2) as ex:
        res = list(ex.map(resume, [0, 1]))
    codes = [s for s, _, _ in res]
    print(f"     two resumes of C's paused sandbox through A and B: {codes} in "
          f"{(time.time() - t0) * 1000:.0f} ms; {[b[:160] for _, b, _ in res]}")
    rec = owners(c).get(psid, {})
    check("resume elsewhere: one node took it over", rec.get("owner") in ("node-a", "node-b")
          and any(200 <= s < 300 for s in codes), f"{codes} {rec}")
    holders = [c.names[i] for i in (0, 1) if any(
        x["sandboxID"] == psid for x in json.loads(c.http(i, "GET", "/sandboxes?limit=1000", hop=True)[1]))]
    check("resume elsewhere: exactly one node holds it, the record's owner",
          holders == [rec.get("owner")], f"{holders} {rec.get('owner')}")
    sdk_env(c, 1 if rec.get("owner") == "node-a" else 0)
    got = Sandbox.connect(psid).files.read("/home/user/kept.txt")
    check("resume elsewhere: the file written before the pause is there", got == f"kept-{psid}", got)
    print(f"     (resume-elsewhere scenario: {time.time() - t0:.1f} s)")
    # One etcd member down too (after the timing: etcd extends every lease when its own
    # leader changes, which would blur the TTL measurement).
    c.etcd[2].kill()
    c.etcd[2].wait()
    sdk_env(c, 1)
    check("kill -9 C: B serves A's sandbox", use(on["node-a"][0]))
    sdk_env(c, 0)
    check("kill -9 C: A serves B's sandbox", use(on["node-b"][0]))
    # The two members left elect a leader if the killed one led (election timeout 1 s).
    for _ in range(10):
        r = sh("etcdctl", "--endpoints", f"http://127.0.0.1:{c.etcd_client[0]}", "put",
               f"{PREFIX}/probe", "x", check=False, env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode == 0:
            break
        time.sleep(0.5)
    check("kill -9 C: etcd keeps quorum with one member down", r.returncode == 0, r.stderr)
    c.start_etcd(2)
    c.start_node(2)
    c.wait_serving(2, timeout=TTL * 4 + 30)
    end = time.time() + 20
    while time.time() < end:
        recs = owners(c)
        if all(recs[i]["state"] == "running" and recs[i]["owner"] == "node-c" for i in on["node-c"]):
            break
        time.sleep(0.3)
    check("restart C (same id): adopts its surviving sandboxes",
          all(recs[i]["state"] == "running" and recs[i]["owner"] == "node-c" for i in on["node-c"]))
    sdk_env(c, 0)
    check("restart C: its sandbox serves through A again", use(on["node-c"][0]))

    # ---- 3. cut B's link ------------------------------------------------------------------
    c.cut(1)
    time.sleep(TTL)  # its lease may still hold before this; after, it must refuse
    b_sid = on["node-b"][0]
    t0 = time.time()
    r = sh("ip", "netns", "exec", c.ns[1], "curl", "-s", "-m", "10",
           "-H", f"X-API-Key: {c.key}", "-H", f"E2b-Sandbox-Id: {b_sid}",
           "-w", "\n%{http_code}", f"{c.url(1)}/health", check=False)
    took = time.time() - t0
    body, _, code = r.stdout.rpartition("\n")
    print(f"     B cut off answered {code} in {took * 1000:.0f} ms: {body}")
    check("partition: B fails fast (503, < 1 s) naming etcd", code == "503" and took < 1.0
          and "etcd" in body, body)
    time.sleep(2)  # B's lease has expired at etcd by now
    t0 = time.time()
    status, body, _ = c.http(0, "GET", f"/sandboxes/{b_sid}", timeout=20)
    print(f"     A answered {status} for B's sandbox in {(time.time() - t0) * 1000:.0f} ms: {body[:200]}")
    check("partition: A answers B's sandbox with an error naming node B",
          status in (502, 503, 504) and "node-b" in json.loads(body).get("message", ""), body)
    c.mend(1)
    c.wait_serving(1, timeout=30)
    time.sleep(2)
    recs = owners(c)
    local = {}
    for i in range(3):
        status, body, _ = c.http(i, "GET", "/sandboxes?limit=1000", hop=True)
        for x in json.loads(body):
            local.setdefault(x["sandboxID"], []).append(c.names[i])
    doubles = {k: v for k, v in local.items() if len(v) > 1}
    check("partition healed: no sandbox held by two nodes", not doubles, str(doubles))
    mismatched = [k for k, v in local.items() if recs.get(k, {}).get("owner") != v[0]]
    check("partition healed: each record names the node holding it", not mismatched, str(mismatched[:5]))
    sdk_env(c, 2)
    check("partition healed: B's sandbox serves through C", use(b_sid))

    # ---- 4. rolling restart -------------------------------------------------------------
    for i in range(3):
        c.kill9(i)
        c.start_node(i)
        c.wait_serving(i, timeout=TTL * 4 + 30)
    time.sleep(2)
    recs = owners(c)
    missing = [i for i in ids if i not in recs]
    check("rolling restart: no acknowledged record lost", not missing, str(missing[:5]))
    not_running = [i for i in ids if recs[i]["state"] != "running"]
    check("rolling restart: every sandbox running", not not_running, str(not_running[:5]))
    sdk_env(c, 1)
    with ThreadPoolExecutor(8) as ex:
        used = list(ex.map(use, ids))
    check(f"rolling restart: all {len(used)} serve through B", all(used))

    # ---- 5. a key revoked on one node is refused by every node --------------------------
    main_key = c.key
    c.key = sh(BIN, "keys", "create", "--name", "doomed", "--data-dir", c.data(1)).stdout.split()[-1]
    deadline = time.time() + 15
    while time.time() < deadline and not all(c.http(i, "GET", "/sandboxes", hop=True)[0] == 200
                                             for i in range(3)):
        time.sleep(0.3)
    check("keys: a key made on B is accepted by A, B and C",
          all(c.http(i, "GET", "/sandboxes", hop=True)[0] == 200 for i in range(3)))
    listed = sh(BIN, "keys", "list", "--data-dir", c.data(1)).stdout
    doomed = next(l.split()[0] for l in listed.splitlines() if l.split()[1:2] == ["doomed"])
    sh(BIN, "keys", "revoke", doomed, "--data-dir", c.data(1))
    t0 = time.time()
    while time.time() - t0 < 15 and any(c.http(i, "GET", "/sandboxes", hop=True)[0] != 401
                                        for i in range(3)):
        time.sleep(0.2)
    codes = [c.http(i, "GET", "/sandboxes", hop=True)[0] for i in range(3)]
    check(f"keys: revoked on B, refused by A, B and C ({time.time() - t0:.1f} s)",
          codes == [401, 401, 401], str(codes))
    time.sleep(3)
    codes = [c.http(i, "GET", "/sandboxes", hop=True)[0] for i in range(3)]
    check("keys: no node imports the revoked key again", codes == [401, 401, 401], str(codes))
    c.key = main_key
    check("keys: the other key still works", c.http(0, "GET", "/sandboxes")[0] == 200)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("CLUSTER_SANDBOXES", "300"))
    if os.geteuid() != 0:
        skip("needs root (network namespaces)")
    for tool in ("etcd", "etcdctl", "ip", "curl", "nsenter"):
        if shutil.which(tool) is None:
            skip(f"{tool} not installed (scripts/setup.sh installs etcd-server and etcd-client)")
    if not os.access(BIN, os.X_OK):
        skip(f"no ringfence binary at {BIN}")
    try:
        import e2b  # noqa: F401
    except ImportError:
        skip("the e2b SDK is not installed in this Python")
    c = Cluster(n)
    try:
        run(c)
        print(f"cluster: all scenarios passed with {n} sandboxes")
    except BaseException:
        for i in range(3):
            print(f"--- node {i} log ---\n{c.tail(i)}")
        raise
    finally:
        c.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Code-interpreter bench through `ringfence serve`'s HTTP API (port 49999 routing).

Starts a release server on a free loopback port with a fresh data dir and measures, with raw
HTTP/1.1 keep-alive (stdlib only, so the client adds as little as possible):

  1. round trip of `run_code("1+1")` in a live sandbox: POST /execute, read the NDJSON stream
     to `end_of_execution` (N rounds after warm-up);
  2. create-sandbox -> first `run_code` result that uses pandas:
     POST /v2/sandboxes {"templateID": "code-interpreter-v1"}, then POST /execute
     `import pandas as pd; pd.DataFrame({"a": [1, 2]}).shape` until its result line;
     then DELETE the sandbox (not timed). Sequential; each round a new sandbox.
  3. for contrast, the same cold: a fresh `python3` importing pandas in a sandbox via
     `commands.run`-style process start (what paying the import per sandbox would cost).

  4. per language (`--languages python,javascript,typescript,bash,java,r`): in a new sandbox,
     the first trivial cell of that language (its default context's kernel start included),
     then the round trip of the same trivial cell in the now-warm kernel.

    python3 bench/interp.py [--rounds 200] [--creates 30] [--languages ...] [--lang-rounds 5]
                            [--bin target/.../release/ringfence]
"""

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import struct
import subprocess
import tempfile
import time


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Client:
    def __init__(self, port, key):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.key = key

    def create(self, template):
        self.conn.request("POST", "/v2/sandboxes", body=json.dumps({"templateID": template}),
                          headers={"X-API-Key": self.key, "Content-Type": "application/json"})
        r = self.conn.getresponse()
        body = json.loads(r.read())
        if r.status != 201:
            raise RuntimeError(f"create: {r.status} {body}")
        return body["sandboxID"], body["envdAccessToken"]

    def execute(self, sid, token, code, language=None):
        """Runs a cell; returns (seconds to the first result line, main result text)."""
        t0 = time.perf_counter()
        body = json.dumps({"code": code, "context_id": None, "language": language, "env_vars": None})
        self.conn.request("POST", "/execute", body=body, headers={
            "Content-Type": "application/json", "E2b-Sandbox-Id": sid,
            "E2b-Sandbox-Port": "49999", "X-Access-Token": token})
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"execute: {r.status} {r.read()[:300]}")
        t_result, text = None, None
        for raw in r:
            msg = json.loads(raw)
            if msg["type"] == "result" and t_result is None:
                t_result, text = time.perf_counter() - t0, msg.get("text")
            elif msg["type"] == "error":
                raise RuntimeError(f"cell failed: {msg}")
            elif msg["type"] == "end_of_execution":
                break
        r.read()
        return t_result, text

    def cold_python(self, sid, token, code):
        """Starts a fresh interpreter in the sandbox through envd and waits for it to exit."""
        msg = json.dumps({"process": {"cmd": "/opt/ringfence/python/bin/python3",
                                      "args": ["-c", code]}, "stdin": False}).encode()
        env = b"\0" + struct.pack(">I", len(msg)) + msg
        self.conn.request("POST", "/process.Process/Start", body=env, headers={
            "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
            "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token})
        r = self.conn.getresponse()
        out = b""
        while True:
            head = r.read(5)
            if len(head) < 5:
                break
            flags, n = head[0], struct.unpack(">I", head[1:])[0]
            data = json.loads(r.read(n))
            if flags & 2:
                break
            out += base64.b64decode(data.get("event", {}).get("data", {}).get("stdout", ""))
        r.read()
        return out

    def kill(self, sid):
        self.conn.request("DELETE", f"/sandboxes/{sid}", headers={"X-API-Key": self.key})
        r = self.conn.getresponse()
        r.read()


PANDAS_CELL = "import pandas as pd; pd.DataFrame({'a': [1, 2]}).shape"

# A trivial cell per language and the main result it must give.
TRIVIAL = {
    "python": ("1+1", "2"),
    "javascript": ("1+1", "2"),
    "typescript": ("const n: number = 1; n + 1", "2"),
    "bash": ("echo 2", None),
    "java": ("1+1", "2"),
    "r": ("1+1", "[1] 2"),
}


def languages(c, names, rounds, warm_rounds=20):
    """First cell of each language in a new sandbox, then its warm round trip."""
    for lang in names:
        code, want = TRIVIAL[lang]
        first, warm = [], []
        for _ in range(rounds):
            sid, tok = c.create("code-interpreter-v1")
            t0 = time.perf_counter()
            _, text = c.execute(sid, tok, code, lang)
            first.append((time.perf_counter() - t0) * 1e3)
            assert text == want, (lang, text)
            for _ in range(warm_rounds):
                t0 = time.perf_counter()
                c.execute(sid, tok, code, lang)
                warm.append((time.perf_counter() - t0) * 1e3)
            c.kill(sid)
        report(f"{lang}: first cell in a new sandbox", first)
        report(f"{lang}: trivial cell round trip, warm kernel", warm)


def report(name, xs):
    print(f"  {name:<52} median {statistics.median(xs):8.2f} ms   p95 {pct(xs, 95):8.2f} ms   n={len(xs)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--creates", type=int, default=30)
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ringfence")
    ap.add_argument("--languages", default="",
                    help="comma-separated: python,javascript,typescript,bash,java,r")
    ap.add_argument("--lang-rounds", type=int, default=5)
    ap.add_argument("--only-languages", action="store_true",
                    help="skip the round-trip / create / cold measurements")
    a = ap.parse_args()
    data = tempfile.mkdtemp()
    os.chmod(data, 0o755)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    key = subprocess.run([a.bin, "keys", "create", "--name", "bench", "--data-dir", data,
                          "--max-sandboxes", "0", "--create-rate", "0"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    log = open(os.path.join(data, "serve.log"), "w")
    srv = subprocess.Popen([a.bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
                           stdout=log, stderr=log, env=dict(os.environ, RINGFENCE_LOG="warn"))
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"ringfence serve at 127.0.0.1:{port}; kernel {os.uname().release}; "
              f"nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}")
        c = Client(port, key)
        # The fork server imports everything once at server start; wait for it (not timed).
        sid, tok = c.create("code-interpreter-v1")
        c.execute(sid, tok, "1+1")
        if a.only_languages:
            c.kill(sid)
            print("\nresults (ms):")
            languages(c, [x for x in a.languages.split(",") if x], a.lang_rounds)
            return

        for _ in range(20):
            c.execute(sid, tok, "1+1")
        rt = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            _, text = c.execute(sid, tok, "1+1")
            rt.append((time.perf_counter() - t0) * 1e3)
            assert text == "2", text
        cold = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = c.cold_python(sid, tok, "import pandas, numpy, matplotlib.pyplot, IPython; print('ok')")
            cold.append((time.perf_counter() - t0) * 1e3)
            assert out == b"ok\n", out
        c.kill(sid)

        first = []
        for _ in range(a.creates):
            t0 = time.perf_counter()
            sid, tok = c.create("code-interpreter-v1")
            _, text = c.execute(sid, tok, PANDAS_CELL)
            first.append((time.perf_counter() - t0) * 1e3)
            assert text == "(2, 1)", text
            c.kill(sid)
        print("\nresults (ms):")
        report('run_code("1+1") round trip, live sandbox', rt)
        report("create -> first pandas result (fork server)", first)
        report("cold: new python3 importing the libraries, per sandbox", cold)
        languages(c, [x for x in a.languages.split(",") if x], a.lang_rounds)
    finally:
        srv.terminate()
        srv.wait(timeout=30)


if __name__ == "__main__":
    main()

"""The rest of E2B 2.63's sandbox surface through the unmodified SDK (and its generated REST
client where the SDK has no wrapper): Idempotency-Key on create, refreshes, v1/v2 logs,
`pause(strict=True)`, `create_snapshot(mode=...)`, `connect(on_resume="reboot")`, the v1
list/create routes, `GET /sandboxes/metrics` and `network={"https_ports": [...]}`."""

import json
import os
import threading
import urllib.error
import urllib.request

import checks
from checks import check
from e2b import Sandbox
from e2b.exceptions import SandboxException


def api(method, path, body=None, headers=None):
    h = {"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"}
    h.update(headers or {})
    req = urllib.request.Request(os.environ["E2B_API_URL"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read()
            return r.status, (json.loads(text) if text.strip() else None)
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, (json.loads(text) if text.strip() else None)


def idempotency():
    a = Sandbox.create(timeout=60, idempotency_key="conformance-retry-1")
    b = Sandbox.create(timeout=60, idempotency_key="conformance-retry-1")
    check("idempotency: a retried create returns the first sandbox", a.sandbox_id == b.sandbox_id,
          (a.sandbox_id, b.sandbox_id))
    ids = []

    def make():
        ids.append(Sandbox.create(timeout=60, idempotency_key="conformance-race-2").sandbox_id)
    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check("idempotency: three concurrent creates with one key make one sandbox", len(set(ids)) == 1, ids)
    listed = [s.sandbox_id for s in Sandbox.list().next_items()]
    check("idempotency: and only one is listed", listed.count(ids[0]) == 1)
    st, body = api("POST", "/v2/sandboxes", {"templateID": "base"}, {"Idempotency-Key": "Not Valid!"})
    check("idempotency: a malformed key is a 400 naming the header", st == 400 and "Idempotency-Key" in body["message"],
          (st, body))
    Sandbox.kill(ids[0])
    a.kill()


def refresh_and_logs():
    s = Sandbox.create(timeout=30)
    try:
        before = s.get_info().end_at
        st, _ = api("POST", f"/sandboxes/{s.sandbox_id}/refreshes", {"duration": 600})
        after = s.get_info().end_at
        check("refreshes: 204 and the sandbox lives longer", st == 204 and after > before, (st, before, after))
        st, body = api("POST", f"/sandboxes/{s.sandbox_id}/refreshes", {"duration": 7200})
        check("refreshes: a duration beyond 3600 s is a 400", st == 400, (st, body))
        s.commands.run("echo logged")
        st, logs = api("GET", f"/sandboxes/{s.sandbox_id}/logs")
        check("logs v1: logs and logEntries name what ran",
              st == 200 and any("exec" in e["message"] for e in logs["logEntries"])
              and len(logs["logs"]) == len(logs["logEntries"]), logs)
        st, v2 = api("GET", f"/v2/sandboxes/{s.sandbox_id}/logs?direction=backward&limit=1")
        check("logs v2: newest first, limited", st == 200 and len(v2["logs"]) == 1, v2)
        st, v2 = api("GET", f"/v2/sandboxes/{s.sandbox_id}/logs?search=no-such-text")
        check("logs v2: search filters", st == 200 and v2["logs"] == [], v2)
        st, _ = api("GET", f"/sandboxes/{s.sandbox_id}/logs", headers={"X-API-Key": os.environ["E2B_API_KEY_2"]})
        check("logs: another key gets 404", st == 404, st)
        st, m = api("GET", f"/sandboxes/metrics?sandbox_ids={s.sandbox_id}")
        check("GET /sandboxes/metrics answers for the caller's sandbox", st == 200 and "sandboxes" in m, m)
        st, v1 = api("GET", "/sandboxes")
        check("v1 GET /sandboxes lists it", st == 200 and s.sandbox_id in [x["sandboxID"] for x in v1], st)
    finally:
        s.kill()


def pause_modes():
    s = Sandbox.create(timeout=120)
    try:
        s.commands.run("sleep 300", background=True)
        check("pause(strict=True) pauses a healthy sandbox", s.pause(strict=True) is True)
        s.connect(on_resume="reboot")
        procs = [p.cmd for p in s.commands.list()]
        check("connect(on_resume='reboot') restarts from the files: no process kept",
              not any("sleep" in c for c in procs), procs)
        snap = s.create_snapshot(mode="filesystem")
        check("create_snapshot(mode='filesystem')", snap.snapshot_id, snap)
        Sandbox.delete_snapshot(snap.snapshot_id)
        try:
            s.create_snapshot(mode="full")
            err = None
        except SandboxException as e:
            err = e
        check("create_snapshot(mode='full') is refused with a clear error", err is not None and "memory" in str(err), err)
    finally:
        s.kill()


def https_ports():
    s = Sandbox.create(timeout=60, network={"https_ports": [8443]})
    try:
        s.commands.run(
            "cd /tmp && openssl req -x509 -newkey rsa:2048 -nodes -keyout k.pem -out c.pem "
            "-subj /CN=sandbox -days 1 >/dev/null 2>&1 && echo secure > index.html")
        s.commands.run(
            "python3 -c \"import http.server as h, ssl\n"
            "c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('c.pem', 'k.pem')\n"
            "s = h.HTTPServer(('127.0.0.1', 8443), h.SimpleHTTPRequestHandler)\n"
            "s.socket = c.wrap_socket(s.socket, server_side=True); s.serve_forever()\"",
            cwd="/tmp", background=True)
        s.commands.run("for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8443) 2>/dev/null && break; sleep 0.1; done")
        # get_host(8443) names the sandbox's port; the server is reached on loopback with it as Host.
        url = os.environ["E2B_SANDBOX_URL"] + "/index.html"
        req = urllib.request.Request(url, headers={"Host": s.get_host(8443),
                                                   "E2B-Traffic-Access-Token": s.traffic_access_token or ""})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                got = (r.status, r.read().decode().strip())
        except urllib.error.HTTPError as e:
            got = (e.code, e.read().decode())
        check("https_ports: a sandbox's own TLS service is reached through get_host", got == (200, "secure"), got)
        net = api("GET", f"/sandboxes/{s.sandbox_id}")[1].get("network", {})
        check("https_ports: shown back with the sandbox", net.get("httpsPorts") == [8443], net)
    finally:
        s.kill()
    try:
        Sandbox.create(timeout=30, network={"https_ports": [49983]})
        check("https_ports: envd's port is refused", False, "created")
    except SandboxException as e:
        check("https_ports: envd's port is refused", "49983" in str(e), str(e))


if __name__ == "__main__":
    https_ports()
    idempotency()
    refresh_and_logs()
    pause_modes()
    print(f"{checks.passed} passed, 0 failed")

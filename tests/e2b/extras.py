"""The rest of E2B 2.63's sandbox surface through the unmodified SDK (and its generated REST
client where the SDK has no wrapper): Idempotency-Key on create, refreshes, v1/v2 logs,
`pause(strict=True)`, `create_snapshot(mode=...)`, `connect(on_resume="reboot")`, the v1
list/create routes, `GET /sandboxes/metrics`, `network={"https_ports": [...]}` and
`network={"egress_proxy": {...}}` (through a SOCKS5 proxy this test runs on 127.0.0.2, which
scripts/conformance.sh exempts from the server's ceiling for it; SKIPPED when not exempted).
The proxy stands in for the internet: it answers every tunnel from a local web server, so the
sandbox's destinations are documentation addresses (203.0.113.0/24) that only it "reaches"."""

import http.server
import json
import os
import socket
import socketserver
import struct
import threading
import urllib.error
import urllib.request

import checks
from checks import check
from e2b import Sandbox
from e2b.exceptions import SandboxException

PROXY_HOST = "127.0.0.2"


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


def socks5_proxy(log, serve_from, user=None, password=None):
    """A tiny SOCKS5 proxy (RFC 1928, password auth RFC 1929) on PROXY_HOST; every tunnel it
    is asked for is appended to `log` as "host:port user=NAME" and served from `serve_from`
    (host, port) whatever its destination."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            c = self.request
            c.settimeout(10)

            def read(n):
                b = b""
                while len(b) < n:
                    chunk = c.recv(n - len(b))
                    if not chunk:
                        raise ConnectionError("closed")
                    b += chunk
                return b

            ver, n = read(2)
            methods = read(n)
            want = 2 if user else 0
            if ver != 5 or want not in methods:
                c.sendall(b"\x05\xff")
                return
            c.sendall(bytes([5, want]))
            who = "-"
            if user:
                _, ul = read(2)
                u = read(ul).decode()
                (pl,) = read(1)
                pw = read(pl).decode()
                if (u, pw) != (user, password):
                    log.append("refused: bad credentials")
                    c.sendall(b"\x01\x01")
                    return
                c.sendall(b"\x01\x00")
                who = u
            _, cmd, _, atyp = read(4)
            if atyp == 1:
                host = socket.inet_ntoa(read(4))
            elif atyp == 3:
                (ln,) = read(1)
                host = "name:" + read(ln).decode()
            else:
                return
            (port,) = struct.unpack("!H", read(2))
            log.append(f"{host}:{port} user={who}")
            up = socket.create_connection(serve_from, timeout=10)
            c.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("0.0.0.0") + b"\x00\x00")
            c.settimeout(None)

            def pump(a, b):
                try:
                    while data := a.recv(65536):
                        b.sendall(data)
                except OSError:
                    pass
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            t = threading.Thread(target=pump, args=(c, up), daemon=True)
            t.start()
            pump(up, c)
            t.join(10)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    srv = Server((PROXY_HOST, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def web(text):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((PROXY_HOST, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def egress_proxy():
    # A proxy at an address the ceiling refuses (the host's loopback) is refused up front.
    try:
        Sandbox.create(timeout=30, network={"egress_proxy": {"address": "127.0.0.1:1080"}})
        check("egress_proxy: a proxy on the host's loopback is refused", False, "created")
    except SandboxException as e:
        check("egress_proxy: a proxy on the host's loopback is refused with 400 naming it",
              "127.0.0.1" in str(e) and "egressProxy" in str(e), str(e))
    try:
        probe = socket.socket()
        probe.bind((PROXY_HOST, 0))
        probe.close()
    except OSError as e:
        print(f"SKIPPED egress_proxy through a proxy: cannot bind {PROXY_HOST}: {e}")
        return
    log, log2 = [], []
    site = web("through the proxy")
    proxy = socks5_proxy(log, site.server_address, "rf", "sdk-proxy-pw")
    proxy2 = socks5_proxy(log2, site.server_address)
    p1, p2 = proxy.server_address[1], proxy2.server_address[1]
    # Documentation addresses (RFC 5737): reached only through the proxy.
    ok_dest, denied_dest = "203.0.113.7:80", "203.0.113.8:80"
    opts = {"address": f"{PROXY_HOST}:{p1}", "username": "rf", "password": "sdk-proxy-pw"}
    try:
        s = Sandbox.create(timeout=60, network={"deny_out": [denied_dest], "egress_proxy": opts})
    except SandboxException as e:
        if "outside what this server lets" in str(e):
            print(f"SKIPPED egress_proxy through a proxy: the server does not exempt {PROXY_HOST} "
                  f"(serve --egress-exempt {PROXY_HOST}/32, as scripts/conformance.sh does): {e}")
            return
        raise
    try:
        r = s.commands.run(f"curl -sS -m 10 http://{ok_dest}/")
        check("egress_proxy: the sandbox's connection goes through the SOCKS5 proxy",
              r.stdout == "through the proxy" and f"{ok_dest} user=rf" in log, (r.stdout, log))
        try:
            r = s.commands.run(f"curl -sS -m 10 http://{denied_dest}/", timeout=30)
            out = r.stdout
        except Exception as e:  # the SDK raises on a non-zero exit (a reset connection)
            out = str(e)
        check("egress_proxy: a denied destination is refused and never reaches the proxy",
              "through the proxy" not in out and not any(denied_dest in x for x in log), (out, log))
        net = api("GET", f"/sandboxes/{s.sandbox_id}")[1].get("network", {})
        check("egress_proxy: shown back without its password",
              net.get("egressProxy") == {"address": opts["address"], "username": "rf"}
              and "sdk-proxy-pw" not in json.dumps(net), net)
        # Live change (E2B's replace semantics: the proxy is repeated to keep tunnelling).
        s.update_network({"deny_out": [denied_dest],
                          "egress_proxy": {"address": f"{PROXY_HOST}:{p2}"}})
        r = s.commands.run(f"curl -sS -m 10 http://{ok_dest}/")
        check("egress_proxy: update_network moves egress to another proxy",
              r.stdout == "through the proxy" and f"{ok_dest} user=-" in log2, (r.stdout, log2))
        s.update_network({"deny_out": [denied_dest]})
        before = len(log) + len(log2)
        # Direct now: the documentation address is not routed, so the connection fails.
        try:
            r = s.commands.run(f"curl -sS -m 3 http://{ok_dest}/", timeout=30)
            out = r.stdout
        except Exception as e:  # the SDK raises on a non-zero exit
            out = str(e)
        check("egress_proxy: an update without it goes out directly (not through a proxy)",
              "through the proxy" not in out and len(log) + len(log2) == before, (out, log, log2))
        _, audit = api("GET", f"/audit?sandbox={s.sandbox_id}&limit=1000")
        check("egress_proxy: no record holds the password", "sdk-proxy-pw" not in json.dumps(audit),
              "password in audit")
    finally:
        s.kill()
        for srv in (proxy, proxy2, site):
            srv.shutdown()


if __name__ == "__main__":
    egress_proxy()
    https_ports()
    idempotency()
    refresh_and_logs()
    pause_modes()
    print(f"{checks.passed} passed, 0 failed")

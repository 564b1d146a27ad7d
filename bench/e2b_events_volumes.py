"""Run with E2B_API_URL, E2B_API_KEY and E2B_VOLUME_API_URL pointing at a ringfence serve.
Volume content API throughput and webhook delivery latency against a running server."""
import http.server, json, os, statistics, threading, time, urllib.request
from e2b import Sandbox, Volume

made = []
for i in range(5):
    t = time.time(); v = Volume.create(f"bench-c{i}-{int(time.time())}"); made.append(time.time() - t)
    Volume.destroy(v.volume_id)
print(f"Volume.create (ext4 image of --disk, mkfs, loop mount): median {statistics.median(made)*1000:.0f} ms (n=5)")
vol = Volume.create(f"bench-{int(time.time())}")
data = os.urandom(16 << 20)  # a replacement needs room for both copies under --disk 64M
w = []
r = []
for _ in range(3):
    t = time.time(); vol.write_file("/blob.bin", data); w.append(time.time() - t)
    t = time.time(); got = vol.read_file("/blob.bin", format="bytes"); r.append(time.time() - t)
    assert got == data
print(f"volume write 16 MiB: median {16/statistics.median(w):.0f} MiB/s; read: {16/statistics.median(r):.0f} MiB/s")
Volume.destroy(vol.volume_id)

seen = {}
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        ev = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen.setdefault(ev["sandboxId"], time.time())
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
req = urllib.request.Request(os.environ["E2B_API_URL"] + "/events/webhooks", method="POST",
    data=json.dumps({"name": "bench", "url": f"http://127.0.0.1:{srv.server_port}/", "enabled": True,
                     "events": ["sandbox.lifecycle.created"], "signatureSecret": "x"}).encode(),
    headers={"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"})
hook = json.loads(urllib.request.urlopen(req).read())
lat = []
for _ in range(10):
    s = Sandbox.create(timeout=60); t = time.time()
    while s.sandbox_id not in seen: time.sleep(0.005)
    lat.append((seen[s.sandbox_id] - t) * 1000); s.kill()
print(f"webhook: create acknowledged -> receiver has the event: median {statistics.median(lat):.0f} ms, max {max(lat):.0f} ms (n=10)")
urllib.request.urlopen(urllib.request.Request(os.environ["E2B_API_URL"] + f"/events/webhooks/{hook['id']}", method="DELETE",
    headers={"X-API-Key": os.environ["E2B_API_KEY"]}))

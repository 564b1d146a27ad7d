#!/usr/bin/env python3
"""The wasm tier's pooled create -> first run_code("1+1"), split into its two requests.

Starts `ringfence serve` (BIN) on a fresh data directory and, N times (sequential, 0.3 s apart
so the tier's pool refills), times POST /v2/sandboxes {"templateID": "code-interpreter-v1@wasm"}
and then the first POST /execute to its result, then deletes the sandbox; also the warm round
trip, and the server's CPU per iteration (the pool refill included). Wasm only: no cgroup
moves, so it can run under `chrt -f` to keep other work on a shared host from the numbers
(the jail cannot: a SCHED_FIFO task cannot join a cgroup v1 cpu group without RT budget).

    python3 bench/wasm_first_cell.py target/x86_64-unknown-linux-gnu/release/ringfence 40

RINGFENCE_PHASES=1 BENCH_LOG=FILE keeps the server's log with its phase timings in FILE.
"""
import os, socket, subprocess, sys, tempfile, time, statistics, json
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interp import Client
BIN = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 30
data = tempfile.mkdtemp(); os.chmod(data, 0o755)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
key = subprocess.run([BIN, "keys", "create", "--name", "b", "--data-dir", data, "--max-sandboxes", "0", "--create-rate", "0"], capture_output=True, text=True).stdout.split()[-1]
srv = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data], stdout=open(data+"/log","w"), stderr=subprocess.STDOUT)
try:
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", port), 0.1).close(); break
        except OSError: time.sleep(0.1)
    c = Client(port, key)
    while True:
        try: sid, tok = c.create("code-interpreter-v1@wasm"); break
        except RuntimeError as e: time.sleep(0.5)
    c.execute(sid, tok, "1+1"); c.conn.request("DELETE", f"/sandboxes/{sid}", headers={"X-API-Key": key}); c.conn.getresponse().read()
    time.sleep(2)
    cr, ex, tot = [], [], []
    def cpu():
        f=open(f"/proc/{srv.pid}/stat").read().rsplit(")",1)[1].split()
        return (int(f[11])+int(f[12]))*10.0
    c0=cpu(); w0=time.perf_counter()
    for i in range(N):
        t0 = time.perf_counter(); sid, tok = c.create("code-interpreter-v1@wasm"); t1 = time.perf_counter()
        _, text = c.execute(sid, tok, "1+1"); t2 = time.perf_counter()
        assert text == "2"
        cr.append((t1-t0)*1e3); ex.append((t2-t1)*1e3); tot.append((t2-t0)*1e3)
        c.conn.request("DELETE", f"/sandboxes/{sid}", headers={"X-API-Key": key}); c.conn.getresponse().read()
        time.sleep(0.3)
    c1=cpu(); print(f"server cpu per create+first cell+delete (incl. pool refill): {(c1-c0)/N:.1f} ms")
    # second cell in one sandbox
    sid, tok = c.create("code-interpreter-v1@wasm"); c.execute(sid, tok, "1+1")
    rt = []
    for i in range(N):
        t0 = time.perf_counter(); c.execute(sid, tok, "1+1"); rt.append((time.perf_counter()-t0)*1e3)
    med = statistics.median
    print(f"create {med(cr):.2f}  first execute {med(ex):.2f}  total {med(tot):.2f}  (warm trip {med(rt):.2f})  load {os.getloadavg()[0]:.1f}")
finally:
    srv.terminate(); srv.wait()
    # With RINGFENCE_PHASES=1 the log has the server's phase timings (bench/phases.py).
    if os.environ.get("BENCH_LOG"):
        subprocess.run(["cp", data + "/log", os.environ["BENCH_LOG"]])
    subprocess.run(["rm", "-rf", data])

"""Lifecycle events and webhooks (E2B's `/events/sandboxes` and `/events/webhooks`), with a
webhook receiver that verifies every signature as E2B documents it.

Phase `before PORT`: registers a webhook to http://127.0.0.1:PORT (nothing listens there yet,
so every delivery fails and is retried), drives one sandbox through created, updated, paused,
resumed, checkpointed and killed (by API) and another to its timeout, checks the event feed
and its causes, and prints the webhook id and the event ids. scripts/conformance.sh then kills
the server with -9 and starts it again. Phase `after PORT HOOK IDS`: starts the receiver
(its first answer is a 500, to prove a retry) and waits until every event of `before`
arrived, each verified, plus the events of a sandbox made after the restart.
"""

import base64
import hashlib
import http.server
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

from checks import check
from e2b import Sandbox

SECRET = "webhook-secret-for-the-conformance-suite"


def api(method, path, body=None, key=None):
    req = urllib.request.Request(os.environ["E2B_API_URL"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"X-API-Key": key or os.environ["E2B_API_KEY"],
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
            return r.status, (json.loads(text) if text.strip() else None)
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, (json.loads(text) if text.strip() else None)


def sign(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(SECRET.encode() + body).digest()).decode().rstrip("=")


def events_of(sid):
    st, evs = api("GET", f"/events/sandboxes/{sid}?orderAsc=true&limit=100")
    assert st == 200, (st, evs)
    return evs


def before(port):
    url = f"http://127.0.0.1:{port}/hook"
    st, bad = api("POST", "/events/webhooks", {"name": "x", "url": url, "enabled": True,
                                              "events": ["sandbox.lifecycle.exploded"],
                                              "signatureSecret": SECRET})
    check("events: an unknown event type is refused with 400 naming it",
          st == 400 and "exploded" in bad["message"], (st, bad))
    st, hook = api("POST", "/events/webhooks", {"name": "conformance", "url": url, "enabled": True,
                                               "signatureSecret": SECRET})
    check("events: a webhook is registered (201, every event by default, secret not echoed)",
          st == 201 and len(hook["events"]) == 6 and SECRET not in json.dumps(hook), (st, hook))
    st, _ = api("PATCH", f"/events/webhooks/{hook['id']}", {"name": "renamed"})
    st2, got = api("GET", f"/events/webhooks/{hook['id']}")
    check("events: PATCH renames it", st == 200 and got["name"] == "renamed", (st, got))
    st, other = api("GET", f"/events/webhooks/{hook['id']}", key=os.environ["E2B_API_KEY_2"])
    check("events: another key cannot see it", st == 404, (st, other))

    s = Sandbox.create(timeout=120, metadata={"suite": "events"})
    s.set_timeout(90)
    s.pause()
    s.connect()
    s.create_snapshot(name=f"events-{int(time.time() * 1000)}")
    s.kill()
    short = Sandbox.create(timeout=1)
    deadline = time.time() + 20
    while time.time() < deadline and not any(
            e["type"] == "sandbox.lifecycle.killed" for e in events_of(short.sandbox_id)):
        time.sleep(0.5)

    evs = events_of(s.sandbox_id)
    types = [e["type"].rsplit(".", 1)[1] for e in evs]
    order = iter(types)
    check("events: the feed has created, updated, paused, resumed, checkpointed, killed in order",
          types[0] == "created" and types[-1] == "killed"
          and all(t in order for t in ["updated", "paused", "resumed", "checkpointed"]), types)
    check("events: E2B's fields (version, id, sandboxId, sandboxTeamId, timestamp)",
          all(e["version"] == "v1" and e["sandboxId"] == s.sandbox_id and e["id"] and e["timestamp"]
              and e["sandboxTeamId"] for e in evs), evs[0])
    check("events: created carries the sandbox's metadata",
          evs[0]["eventData"]["sandbox_metadata"] == {"suite": "events"}, evs[0])
    check("events: API actions name their cause and key",
          all(e["eventData"]["cause"] == "api" and e["eventData"]["api_key_id"] for e in evs), evs)
    check("events: updated carries the new end (set_timeout)", "set_timeout" in evs[1]["eventData"], evs[1])
    check("events: paused and resumed say whether memory was kept",
          all("memory" in e["eventData"] for e in evs if e["type"].endswith(("paused", "resumed"))), evs)
    short_evs = events_of(short.sandbox_id)
    check("events: a sandbox that ran out of time is killed with cause timeout",
          short_evs[-1]["type"] == "sandbox.lifecycle.killed"
          and short_evs[-1]["eventData"]["cause"] == "timeout", short_evs)
    st, team = api("GET", "/events/sandboxes?limit=100")
    team_ids = {e["id"] for e in team}
    check("events: the team feed holds both sandboxes' events, newest first",
          {e["id"] for e in evs + short_evs} <= team_ids and team[0]["timestamp"] >= team[-1]["timestamp"],
          len(team))
    st, other = api("GET", f"/events/sandboxes/{s.sandbox_id}", key=os.environ["E2B_API_KEY_2"])
    check("events: another key sees none of them", st == 200 and other == [], other)
    st, bad = api("GET", "/events/sandboxes?limit=0")
    check("events: a bad limit is a 400", st == 400, (st, bad))

    time.sleep(1.5)
    st, log = api("GET", f"/events/webhooks/{hook['id']}/deliveries")
    check("events: deliveries to a receiver that is down are pending with their error",
          st == 200 and len(log) == len(evs) + len(short_evs)
          and all(d["state"] == "pending" for d in log)
          and any(d["attempts"] >= 1 and d["lastError"] for d in log), log[:2])
    ids = [e["id"] for e in evs + short_evs]
    print(hook["id"], ",".join(ids))


class Receiver(http.server.BaseHTTPRequestHandler):
    seen = {}
    bad = []
    answered = 0
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with Receiver.lock:
            Receiver.answered += 1
            first = Receiver.answered == 1
            if self.headers.get("e2b-signature") != sign(body) \
                    or self.headers.get("e2b-signature-version") != "v1":
                Receiver.bad.append(self.headers.get("e2b-signature"))
            elif not first:
                ev = json.loads(body)
                Receiver.seen[ev["id"]] = (ev, self.headers.get("e2b-webhook-id"))
        self.send_response(500 if first else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def after(port, hook, ids):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    want = set(ids.split(","))
    deadline = time.time() + 30
    while time.time() < deadline and not want <= set(Receiver.seen):
        time.sleep(0.2)
    check("webhooks: every event of before the kill -9 arrived once the server was back",
          want <= set(Receiver.seen), sorted(want - set(Receiver.seen)))
    check("webhooks: every delivery's e2b-signature verifies (sha256 of secret + body)",
          not Receiver.bad, Receiver.bad)
    check("webhooks: deliveries name their webhook", all(h == hook for _, h in Receiver.seen.values()))
    s = Sandbox.create(timeout=60)
    s.kill()
    deadline = time.time() + 15
    fresh = lambda: {ev["type"] for ev, _ in Receiver.seen.values() if ev["sandboxId"] == s.sandbox_id}
    while time.time() < deadline and len(fresh()) < 2:
        time.sleep(0.2)
    check("webhooks: a sandbox made after the restart is delivered too",
          fresh() == {"sandbox.lifecycle.created", "sandbox.lifecycle.killed"}, fresh())
    time.sleep(0.5)
    st, log = api("GET", f"/events/webhooks/{hook}/deliveries?limit=1000")
    ours = want | {ev["id"] for ev, _ in Receiver.seen.values() if ev["sandboxId"] == s.sandbox_id}
    log = [d for d in log if d["eventId"] in ours]
    check("webhooks: the delivery log shows every delivery delivered, one after a retry",
          st == 200 and all(d["state"] == "delivered" and d["lastStatus"] == 200 for d in log)
          and any(d["attempts"] >= 2 for d in log), [(d["state"], d["attempts"]) for d in log])
    st, _ = api("DELETE", f"/events/webhooks/{hook}")
    st2, _ = api("GET", f"/events/webhooks/{hook}")
    check("webhooks: deleted", st == 200 and st2 == 404, (st, st2))
    server.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "before":
        before(int(sys.argv[2]))
    else:
        after(int(sys.argv[2]), sys.argv[3], sys.argv[4])

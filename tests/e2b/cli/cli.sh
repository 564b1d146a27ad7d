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
# `template create` (the Dockerfile parsed by the CLI into the Template SDK's steps, built
# through the build API), `template list`, `template delete`, on the busybox base
# scripts/conformance.sh builds (rf-busybox).
if $e2b template list 2>&1 | grep -q rf-busybox; then
  proj=$(mktemp -d)
  echo "from the cli" > "$proj/hello.txt"
  printf '%s\n' 'FROM rf-busybox' 'COPY hello.txt /opt/hello.txt' 'RUN echo ran > /opt/ran' \
    'WORKDIR /opt' > "$proj/e2b.Dockerfile"
  check "template create builds a Dockerfile" "$($e2b template create cli-made --path "$proj" 2>&1)" \
    "Sandbox.create(\"cli-made\")"
  check "template list shows it" "$($e2b template list 2>&1)" "cli-made"
  got=$("$VENV/bin/python" -c "
from e2b import Sandbox
s = Sandbox.create('cli-made')
print(s.commands.run('cat /opt/hello.txt /opt/ran').stdout)
s.kill()")
  check "a sandbox from it has the files" "$got" "from the cli"
  $e2b template delete cli-made -y >/dev/null 2>&1
  check "template delete removes it" "$($e2b template list 2>&1 | grep -c cli-made || true)" "0"
  rm -rf "$proj"
else
  echo "SKIPPED cli: template create (no rf-busybox base: busybox-static missing)"
fi
echo "$passed passed, 0 failed"

#!/usr/bin/env bash
# Cluster mode end to end (tests/cluster/cluster.py): three etcd members, three nodes in their
# own network namespaces, the unmodified `e2b` SDK. CLUSTER_SANDBOXES sets how many sandboxes
# (default 300). Needs root, etcd (scripts/setup.sh) and a built ringfence; SKIPPED without.
set -euo pipefail
cd "$(dirname "$0")/.."
export RINGFENCE_BIN=${RINGFENCE_BIN:-target/x86_64-unknown-linux-gnu/release/ringfence}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import e2b' 2>/dev/null || "$VENV/bin/pip" install -q --upgrade e2b
exec "$VENV/bin/python" tests/cluster/cluster.py "$@"

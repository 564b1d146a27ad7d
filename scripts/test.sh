#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then the whole test suite. Run as root: the tests
# create namespaces, cgroups and mounts (without root they print SKIPPED and pass nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The code interpreter's kernels on their own (scripts/setup.sh built the environment).
/opt/ringfence/python/bin/python3 -m unittest interp/python/test_kernel.py
node --test interp/js/test-kernel.mjs
# The unmodified e2b SDKs (from PyPI and npm) against a live `ringfence serve`.
scripts/conformance.sh
# Cluster mode: three etcd members and three nodes in network namespaces, 300 sandboxes
# through the unmodified e2b SDK (SKIPPED without etcd).
scripts/cluster.sh "${CLUSTER_SANDBOXES:-300}"

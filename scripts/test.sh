#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then the whole test suite. Run as root: the tests
# create namespaces, cgroups and mounts (without root they print SKIPPED and pass nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { echo "test.sh: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }
t0=$SECONDS
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
phase "fmt + clippy"
cargo test --workspace --locked --no-fail-fast
phase "cargo test"
# The code interpreter's kernels on their own (scripts/setup.sh built the environment).
/opt/ringfence/python/bin/python3 -m unittest interp/python/test_kernel.py
node --test interp/js/test-kernel.mjs
phase "kernel unit tests"
# The unmodified e2b SDKs (from PyPI and npm) against a live `ringfence serve`: the debug
# build, or the binary SDK_SERVER_BIN names (CI gives it the release build).
RINGFENCE_BIN="${SDK_SERVER_BIN:-${RINGFENCE_BIN:-target/x86_64-unknown-linux-gnu/debug/ringfence}}" \
  scripts/conformance.sh
phase "SDK suites"
# Cluster mode: three etcd members and three nodes in network namespaces, 300 sandboxes
# through the unmodified e2b SDK (SKIPPED without etcd), on the same binary as the SDK suites.
RINGFENCE_BIN="${SDK_SERVER_BIN:-${RINGFENCE_BIN:-target/x86_64-unknown-linux-gnu/debug/ringfence}}" \
  scripts/cluster.sh "${CLUSTER_SANDBOXES:-300}"
phase "cluster"

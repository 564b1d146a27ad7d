#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then the whole test suite. Run as root: the tests
# create namespaces, cgroups and mounts (without root they print SKIPPED and pass nothing).
#
# The tests are built with the release profile, like the binaries the SDK suites, cluster mode
# and the specification drive (what operators run): one optimised build serves all of them,
# where a debug profile compiled all ~430 crates a second time (7.4 min of a 2-core host,
# against 6.6 min for the release profile's test targets on top of a release build), and the
# tests run in 283 s instead of 414 s. Overflow checks stay on for the workspace's own crates
# in release builds (Cargo.toml), so the tests lose none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { echo "test.sh: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }
t0=$SECONDS
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
phase "fmt + clippy"
cargo test --release --workspace --locked --no-fail-fast
phase "cargo test"
# The code interpreter's kernels on their own (scripts/setup.sh built the environment). The
# JavaScript suite mostly waits (timers, a kernel's restart: 34 s of wall time, 6 s of CPU),
# so it runs beside the Python one.
js_log=$(mktemp)
node --test interp/js/test-kernel.mjs > "$js_log" 2>&1 &
js=$!
py_ok=0
/opt/ringfence/python/bin/python3 -m unittest interp/python/test_kernel.py || py_ok=$?
js_ok=0
wait "$js" || js_ok=$?
cat "$js_log"
rm -f "$js_log"
if [ "$py_ok" != 0 ] || [ "$js_ok" != 0 ]; then
  echo "kernel unit tests failed (python $py_ok, js $js_ok)"
  exit 1
fi
phase "kernel unit tests"
# The unmodified e2b SDKs (from PyPI and npm) against a live `ringfence serve`: the release
# binary `cargo test` built for its own integration tests (so the same features, and no
# second build), or the binary RINGFENCE_BIN names.
bin="${RINGFENCE_BIN:-target/x86_64-unknown-linux-gnu/release/ringfence}"
RINGFENCE_BIN="$bin" scripts/conformance.sh
phase "SDK suites"
# Cluster mode: three etcd members and three nodes in network namespaces, 300 sandboxes
# through the unmodified e2b SDK (SKIPPED without etcd), on the same binary as the SDK suites.
RINGFENCE_BIN="$bin" scripts/cluster.sh "${CLUSTER_SANDBOXES:-300}"
phase "cluster"

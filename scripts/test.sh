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
# With the release profile, clippy reuses the release build's build scripts and proc macros
# (SQLite's C among them) and only checks the crates: 4.1 min instead of 5.9 on a fresh
# 2-core host. The workspace has no `cfg(debug_assertions)` code, so it lints the same code.
cargo clippy --release --workspace --all-targets --locked -- -D warnings
phase "fmt + clippy"
# Every target built first (CI's .ci/run has done it: then nothing is left to compile), so the
# two lanes below only run tests.
cargo test --release --workspace --locked --no-run
phase "test build"
# Two lanes, because cargo runs one test binary at a time and the suite leaves a core idle
# for a third of its time (measured: 1.2 of 2 cores busy over 408 s). The long binaries that
# mostly wait, `microvm` (guests under QEMU's emulation: one core, 90 s) and `debian`
# (debootstrap from the archive: the network, 80 s), then the doc tests and the code
# interpreter's kernel unit tests, run beside every other test binary. That lane's log is
# printed when both are done.
slow=(microvm debian)
mapfile -t rest < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
slow = set(sys.argv[1:])
names = {t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"]
         if "test" in t["kind"] and t["name"] not in slow}
print("\n".join(sorted(names)))' "${slow[@]}")
# A listing that failed would leave the lane below running only the unit tests.
[ "${#rest[@]}" -gt 10 ] \
  || { echo "test.sh: cargo metadata listed ${#rest[@]} test targets"; exit 1; }
lane_log=$(mktemp)
(
  ok=0
  cargo test --release --workspace --locked --no-fail-fast $(printf -- '--test %s ' "${slow[@]}") \
    || ok=1
  # Doc tests (the other lane names its targets, which leaves them out).
  cargo test --release --workspace --locked --doc || ok=1
  # The code interpreter's kernels on their own (scripts/setup.sh built the environment); the
  # JavaScript suite mostly waits (timers, a kernel's restart), so it runs beside the Python one.
  node --test interp/js/test-kernel.mjs > "$lane_log.js" 2>&1 &
  js=$!
  /opt/ringfence/python/bin/python3 -m unittest interp/python/test_kernel.py || ok=1
  wait "$js" || { echo "kernel unit tests failed (javascript)"; ok=1; }
  cat "$lane_log.js"
  rm -f "$lane_log.js"
  exit "$ok"
) > "$lane_log" 2>&1 &
lane=$!
rest_ok=0
cargo test --release --workspace --locked --no-fail-fast --lib --bins \
  $(printf -- '--test %s ' "${rest[@]}") || rest_ok=$?
lane_ok=0
wait "$lane" || lane_ok=$?
echo "--- the other lane: ${slow[*]}, doc tests, kernel unit tests ---"
cat "$lane_log"
rm -f "$lane_log"
if [ "$rest_ok" != 0 ] || [ "$lane_ok" != 0 ]; then
  echo "tests failed (this lane $rest_ok; ${slow[*]}, doc tests and kernel unit tests $lane_ok)"
  exit 1
fi
phase "cargo test and kernel unit tests"
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

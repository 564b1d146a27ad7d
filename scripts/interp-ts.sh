#!/usr/bin/env bash
# Installs the TypeScript compiler that `typescript` code-interpreter contexts use to turn each
# cell into JavaScript (run as root): the npm package `typescript`, pinned, inside the
# interpreter environment (${RINGFENCE_INTERP_ENV:-/opt/ringfence/python}/share/ringfence/typescript)
# so that sandboxes see it through that environment's template layer (a layer of its own costs
# every create), world-readable because they load it read-only as an unprivileged uid. Run it
# after scripts/interp-env.sh, which rebuilds the environment from scratch when its lock changes. The 5.x line: 7.x is the native (Go) compiler without the
# JavaScript API (`transpileModule`) that the kernel calls. Does nothing when the pinned
# version is there.
set -euo pipefail
umask 022
version=5.9.3
dir="${RINGFENCE_INTERP_ENV:-/opt/ringfence/python}/share/ringfence/typescript"
if [ "$(cat "$dir/.ringfence-stamp" 2>/dev/null)" = "$version" ]; then
  echo "interp-ts: up to date"
  exit 0
fi
rm -rf "$dir"
mkdir -p "$dir"
npm install --silent --no-audit --no-fund --prefix "$dir" "typescript@$version"
chmod -R a+rX,go-w "$dir"
echo "$version" >"$dir/.ringfence-stamp"
echo "interp-ts: ready"

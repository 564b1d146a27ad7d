#!/usr/bin/env bash
# Installs the Rust toolchain that `rust` code-interpreter contexts compile their cells with
# (run as root): the rustc and cargo that build Ringfence itself (the toolchain CI brings,
# Rust 1.95), copied inside the interpreter environment
# (${RINGFENCE_INTERP_ENV:-/opt/ringfence/python}/share/ringfence/rust) so that sandboxes see
# it read-only through that environment's template layer, at a path that is not the host's
# $HOME (rustup keeps toolchains under /root, which sandboxes must not see). Only what compiling
# a crate needs: rustc, cargo, their libraries, the standard library's rlibs and the linker
# wrappers (rust-lld, gcc-ld), not docs or sources. Hard links where the toolchain is on the
# same filesystem (no space, instant), a copy otherwise. Run it after scripts/interp-env.sh,
# which rebuilds the environment from scratch when its lock changes. Does nothing when the
# same rustc is there.
set -euo pipefail
umask 022
sysroot="$(rustc --print sysroot)"
version="$("$sysroot/bin/rustc" --version)"
dir="${RINGFENCE_INTERP_ENV:-/opt/ringfence/python}/share/ringfence/rust"
if [ "$(cat "$dir/.ringfence-stamp" 2>/dev/null)" = "$version" ]; then
  echo "interp-rust: up to date"
  exit 0
fi
host=x86_64-unknown-linux-gnu
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/lib/rustlib/$host"
copy() { cp -al "$@" 2>/dev/null || cp -a "$@"; }
copy "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$tmp/bin/"
copy "$sysroot"/lib/*.so* "$tmp/lib/"
copy "$sysroot/lib/rustlib/$host/lib" "$sysroot/lib/rustlib/$host/bin" "$tmp/lib/rustlib/$host/"
chmod -R a+rX "$tmp"
echo "$version" >"$tmp/.ringfence-stamp"
rm -rf "$dir"
mv "$tmp" "$dir"
echo "interp-rust: ready ($version)"

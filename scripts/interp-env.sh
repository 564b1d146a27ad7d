#!/usr/bin/env bash
# Builds the Python environment that code-interpreter kernels run in (run as root):
# a venv of Debian's /usr/bin/python3 at ${RINGFENCE_INTERP_ENV:-/opt/ringfence/python} with
# interp/requirements.lock installed, matplotlib's font cache prebuilt and everything
# byte-compiled and world-readable, because sandboxes use it read-only as an unprivileged uid.
#
# A venv cannot be built elsewhere and renamed into place (its scripts and pyvenv.cfg embed its
# absolute path), so it is built in place under a lock, and a stamp holding the lock's hash is
# written last: an environment without a matching stamp is half-built or stale and is removed
# before rebuilding (stop kernels and the fork server first). With a matching stamp the script
# does nothing.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."

env_dir="${RINGFENCE_INTERP_ENV:-/opt/ringfence/python}"
lock_file="interp/requirements.lock"
stamp="$env_dir/.ringfence-stamp"
# Not sys.executable of whatever python3 is first on PATH (a pyenv build here, invisible to
# sandboxes): the interpreter must be the system one that sandboxes see at the same path.
python=/usr/bin/python3

want="$(sha256sum "$lock_file" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"

mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "interp-env: up to date"
  exit 0
fi

echo "interp-env: building $env_dir"
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
"$env_dir/bin/pip" install --quiet --no-deps --only-binary=:all: --require-virtualenv \
  -r "$lock_file"
"$env_dir/bin/pip" check

# Kernels seed their writable matplotlib cache from here (see ringfence_kernel.py), so a cold
# start never rescans the system's fonts.
mpl_dir="$env_dir/share/ringfence/mplconfig"
mkdir -p "$mpl_dir"
MPLCONFIGDIR="$mpl_dir" MPLBACKEND=Agg "$env_dir/bin/python" -c 'import matplotlib.font_manager'
ls "$mpl_dir"/fontlist-*.json >/dev/null

"$env_dir/bin/python" -m compileall -q -j 0 "$env_dir/lib" >/dev/null
chmod -R a+rX,go-w "$env_dir"

printf '%s\n' "$want" >"$stamp.tmp"
chmod 644 "$stamp.tmp"
mv "$stamp.tmp" "$stamp"
echo "interp-env: ready"

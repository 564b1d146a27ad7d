#!/usr/bin/env bash
# Installs gVisor's `runsc` for the `gvisor` tier (run as root) at
# ${RINGFENCE_RUNSC:-/usr/local/lib/ringfence/runsc}.
#
# Debian 12's own runsc (2022) has only the ptrace and kvm platforms: ptrace costs ~80 µs per
# syscall on a nested host and kvm hangs on PVM hosts. Debian 13's (0.0~20240729) has systrap
# (~4 µs per syscall) and is a static binary with no Depends, so it runs here. It is fetched with
# the ordinary apt client against the same Debian archive the system already uses, through a
# private sources list, lists and cache directory: the system's apt configuration and package
# database are left untouched, and nothing is installed through dpkg.
#
# Idempotent: an installed runsc of the wanted version is left alone.
set -euo pipefail
umask 022

dest="${RINGFENCE_RUNSC:-/usr/local/lib/ringfence/runsc}"
want_version="${RINGFENCE_RUNSC_VERSION:-0.0~20240729}"
suite="${RINGFENCE_RUNSC_SUITE:-trixie}"
state="${RINGFENCE_RUNSC_APT_DIR:-/var/cache/ringfence/runsc-apt}"

# A version stamp beside the binary: `runsc --version` prints the upstream release date, not the
# Debian version, so the stamp says which package the binary came from.
stamp="$dest.version"
if [ -x "$dest" ] && [ -f "$stamp" ] && grep -q "^runsc ${want_version}" "$stamp"; then
  echo "install-runsc: $(cat "$stamp") present at $dest"
  exit 0
fi

# The mirror the system already uses (deb822 sources or the one-line list), else Debian's.
mirror=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  mirror="$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
  >"$state/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$state/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$state/lists"
  -o "Dir::Cache=$state/cache"
  -o "Dir::State::status=/dev/null"
  -o "APT::Get::List-Cleanup=0"
)
echo "install-runsc: fetching runsc from $mirror $suite"
apt-get "${apt_opts[@]}" update -qq
version="$(apt-cache "${apt_opts[@]}" show runsc | awk '/^Version:/ {print $2; exit}')"
case "$version" in
  "$want_version"*) ;;
  *) echo "install-runsc: $suite has runsc '$version', expected $want_version*" >&2; exit 1 ;;
esac
rm -rf "$state/debs" "$state/root"
mkdir -p "$state/debs" "$state/root"
# apt downloads as its unprivileged _apt user where it can write the target directory.
if id _apt >/dev/null 2>&1; then chown _apt "$state/debs"; fi
(cd "$state/debs" && apt-get "${apt_opts[@]}" download -qq "runsc=$version")
dpkg-deb -x "$state"/debs/runsc_*.deb "$state/root"
bin="$state/root/usr/bin/runsc"
[ -x "$bin" ] || { echo "install-runsc: the package has no usr/bin/runsc" >&2; exit 1; }
"$bin" --version >/dev/null

mkdir -p "$(dirname "$dest")"
# Copied under a temporary name and renamed, so a concurrent reader never sees half a binary.
install -m 0755 "$bin" "$dest.tmp"
mv -f "$dest.tmp" "$dest"
echo "runsc $version ($suite)" >"$stamp"
rm -rf "$state/debs" "$state/root"
echo "install-runsc: installed runsc $version at $dest"

#!/usr/bin/env bash
# Installs what the `microvm` tier needs (run as root): QEMU (Debian's qemu-system-x86, whose
# `-M microvm` machine boots a guest in ~2 s under TCG) and Debian's cloud kernel, unpacked (never
# installed) into ${RINGFENCE_MICROVM_DIR:-/usr/local/lib/ringfence/microvm}:
#   vmlinux       the uncompressed kernel (an ELF with a PVH entry note, which QEMU boots directly;
#                 cut out of the LZ4-compressed bzImage, as Debian's cloud kernel is built LZ4)
#   modules/*.ko  the few modules the guest's agent loads itself (virtio-mmio, the console,
#                 block and network drivers, overlayfs): the cloud kernel builds them as modules
#   version       which package they came from
# The package is fetched with the ordinary apt client (`apt-get download`) and unpacked with
# `dpkg-deb -x`: the host's own kernel and package database are untouched.
#
# Idempotent: an installed kernel of the wanted package with the wanted modules is left alone.
set -euo pipefail
umask 022
export DEBIAN_FRONTEND=noninteractive

dest="${RINGFENCE_MICROVM_DIR:-/usr/local/lib/ringfence/microvm}"
meta="${RINGFENCE_MICROVM_KERNEL_PACKAGE:-linux-image-cloud-amd64}"
work="${RINGFENCE_MICROVM_APT_DIR:-/var/cache/ringfence/microvm-apt}"
# In the order the guest loads them (each after what it depends on).
# virtio_net needs net_failover, which needs failover (modinfo's depends=).
modules=(virtio_ring virtio virtio_mmio virtio_console virtio_blk failover net_failover virtio_net overlay)

need=()
for pkg in qemu-system-x86 lz4; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The versioned package the meta-package points at (linux-image-6.1.0-NN-cloud-amd64).
pkg="$(apt-cache depends "$meta" | awk '/Depends: linux-image-/ {print $2; exit}')"
[ -n "$pkg" ] || { echo "install-microvm: no kernel package behind $meta" >&2; exit 1; }
if [ -f "$dest/version" ] && [ "$(cat "$dest/version")" = "$pkg" ] && [ -f "$dest/vmlinux" ] &&
  [ "$(cat "$dest/modules/order" 2>/dev/null)" = "$(printf '%s\n' "${modules[@]}")" ]; then
  echo "install-microvm: $pkg present at $dest"
  exit 0
fi

rm -rf "$work"
mkdir -p "$work/root"
# apt downloads as its unprivileged _apt user where it can write the target directory.
if id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
(cd "$work" && apt-get download -qq "$pkg")
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
bz="$(ls "$work"/root/boot/vmlinuz-*)"
kver="${bz##*/vmlinuz-}"

# The LZ4 legacy frame magic (02 21 4c 18) starts the compressed kernel inside the bzImage;
# lz4 stops at the bzImage's trailer after it, complaining, which is expected.
off="$(grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -n1 | cut -d: -f1)"
[ -n "$off" ] || { echo "install-microvm: no LZ4 kernel inside $bz" >&2; exit 1; }
tail -c +"$((off + 1))" "$bz" | lz4 -d -c >"$work/vmlinux" 2>/dev/null || true
head -c 4 "$work/vmlinux" | grep -q 'ELF' || { echo "install-microvm: $bz did not unpack to an ELF kernel" >&2; exit 1; }

mkdir -p "$dest.tmp/modules"
install -m 0644 "$work/vmlinux" "$dest.tmp/vmlinux"
for m in "${modules[@]}"; do
  ko="$(find "$work/root/lib/modules/$kver" -name "$m.ko" | head -n1)"
  [ -n "$ko" ] || { echo "install-microvm: module $m missing from $pkg" >&2; exit 1; }
  install -m 0644 "$ko" "$dest.tmp/modules/$m.ko"
done
printf '%s\n' "${modules[@]}" >"$dest.tmp/modules/order"
echo "$pkg" >"$dest.tmp/version"
# Replaced whole, so a reader never sees a kernel without its modules.
rm -rf "$dest.old"
[ -d "$dest" ] && mv "$dest" "$dest.old"
mv "$dest.tmp" "$dest"
rm -rf "$dest.old" "$work"
echo "install-microvm: installed $pkg ($kver) at $dest"

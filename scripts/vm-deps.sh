#!/usr/bin/env bash
# Install what the qemu provider's tests need on Debian 12 (run as root): qemu, qemu-img,
# e2fsprogs, the static busybox, socat (egress VMs reach allowed endpoints through it), and a Debian kernel unpacked (not installed: no
# initramfs hooks, nothing in /boot) into /opt/slate-vm/kernel, where
# slate_testkit::vm_image looks for it.
set -euo pipefail
KERNEL_DIR=/opt/slate-vm/kernel
need=()
for pkg in qemu-system-x86 qemu-utils e2fsprogs busybox-static cpio kmod socat; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
updated=
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  updated=1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! ls "$KERNEL_DIR"/boot/vmlinuz-* >/dev/null 2>&1; then
  [ -n "$updated" ] || apt-get update -qq
  # linux-image-amd64 is the metapackage; its dependency names the versioned kernel.
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "vm-deps: cannot find the Debian kernel package" >&2; exit 1; }
  tmp=$(mktemp -d)
  chown _apt "$tmp" 2>/dev/null || chmod 777 "$tmp" # apt fetches as _apt
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq "$pkg")
  rm -rf "$KERNEL_DIR.new"
  mkdir -p "$KERNEL_DIR.new"
  dpkg-deb -x "$tmp"/"$pkg"_*.deb "$KERNEL_DIR.new"
  # The package's postinst would run depmod; the image builder reads modules.dep.
  depmod -b "$KERNEL_DIR.new" "${pkg#linux-image-}"
  rm -rf "$KERNEL_DIR"
  mv "$KERNEL_DIR.new" "$KERNEL_DIR"
fi

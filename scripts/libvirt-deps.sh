#!/usr/bin/env bash
# Bring up a local libvirt for the libvirt provider's tests on Debian 12 (run as root):
# installs Debian's libvirt daemon, its qemu driver and virsh if missing, starts virtlogd
# and libvirtd directly (no systemd as PID 1 in containers), and makes sure the storage
# pool `default` (dir, /var/lib/libvirt/images) exists and is active. Safe to run again.
#
# Security model: nothing in /etc/libvirt/qemu.conf is changed. slate's domains carry a
# per-domain `<seclabel type='static' model='dac' relabel='no'>` running their qemu as
# root:root (like the qemu provider's qemu), so libvirt neither chowns slate's files nor
# needs them readable by libvirt-qemu. See crates/slate-provider/src/libvirt.rs.
set -euo pipefail

need=()
for pkg in libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# libvirtd checks its cached qemu capabilities against /dev/kvm being usable by the qemu
# user (libvirt-qemu, group kvm). In a container /dev/kvm is often root-only (no udev),
# which makes libvirtd re-probe qemu on every domain start: ~1 minute per `virsh create`
# instead of ~0.5 s. Give it the mode udev gives it on a Debian host.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

running() { pgrep -x "$1" >/dev/null 2>&1; }

mkdir -p /run/libvirt /var/log/libvirt/qemu
# Started (again) whenever not running, also while waiting: a daemon that was just told
# to stop may still be on its way out on the first look.
ready=
for _ in $(seq 1 300); do
  if ! running virtlogd; then
    virtlogd -d
  fi
  if ! running libvirtd; then
    # A stale pidfile from a killed daemon makes libvirtd refuse to start.
    rm -f /run/libvirtd.pid
    libvirtd -d
  fi
  # virtlogd too: without it every domain start fails ("virtlogd-sock").
  if running virtlogd && [ -S /run/libvirt/virtlogd-sock ] &&
    virsh -q -c qemu:///system version >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "libvirt-deps: libvirtd does not answer on qemu:///system, or virtlogd is not running" >&2
  exit 1
fi

pool=default
dir=/var/lib/libvirt/images
if ! virsh -q -c qemu:///system pool-info "$pool" >/dev/null 2>&1; then
  mkdir -p "$dir"
  virsh -q -c qemu:///system pool-define-as "$pool" dir --target "$dir" >/dev/null
  virsh -q -c qemu:///system pool-autostart "$pool" >/dev/null
fi
# Captured first: with pipefail, `grep -q` closing the pipe early would fail the check.
pool_running() {
  local info
  info=$(virsh -q -c qemu:///system pool-info "$pool" 2>/dev/null) || return 1
  grep -Eq '^State:[[:space:]]+running' <<<"$info"
}
if ! pool_running; then
  mkdir -p "$dir"
  # A just started libvirtd may be autostarting it at the same moment.
  virsh -q -c qemu:///system pool-start "$pool" >/dev/null 2>&1 || pool_running || {
    echo "libvirt-deps: cannot start storage pool $pool" >&2
    exit 1
  }
fi
echo "libvirt-deps: libvirtd $(virsh -q -c qemu:///system version --daemon | awk '/daemon/ {print $NF}') ready, pool $pool active"

#!/usr/bin/env bash
# Install the system packages slate and its tests need on Debian/Ubuntu (run as root);
# nftables and iproute2 for sandboxes with network = "egress", socat for egress VMs.
set -euo pipefail
need=()
for pkg in runc debootstrap busybox-static git curl openssl ca-certificates tar iproute2 nftables socat; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

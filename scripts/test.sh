#!/usr/bin/env bash
# Run every test of slate (unit, integration, end-to-end with real runc sandboxes), plus
# the formatting and lint gates. Needs root on Debian/Ubuntu; installs what is missing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/install-deps.sh"
"$ROOT/scripts/vm-deps.sh"          # qemu, a Debian kernel for VM tests
"$ROOT/scripts/libvirt-deps.sh"     # libvirtd started without systemd
for extra in postgres.sh ui-deps.sh; do  # PostgreSQL server, headless Chromium
  if [ -x "$ROOT/scripts/$extra" ]; then "$ROOT/scripts/$extra"; fi
done
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"

#!/usr/bin/env bash
# Build slate-agent as a fully static binary (it must run in any image) and copy it to $1
# (default: next to `slate` in the release target dir). Honours CARGO_TARGET_DIR, so a
# shared or pre-warmed target directory is used for both.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p slate-agent \
  --manifest-path "$ROOT/Cargo.toml" --target "$TRIPLE" --target-dir "$TARGET/static-agent"
install -D -m 0755 "$TARGET/static-agent/$TRIPLE/release/slate-agent" "${1:-$TARGET/release/slate-agent}"

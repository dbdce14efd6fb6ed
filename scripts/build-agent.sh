#!/usr/bin/env bash
# Build slate-agent as a fully static binary (it must run in any image) and copy it to $1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p slate-agent \
  --manifest-path "$ROOT/Cargo.toml" --target "$TRIPLE" --target-dir "$ROOT/target/static-agent"
install -m 0755 "$ROOT/target/static-agent/$TRIPLE/release/slate-agent" "${1:-$ROOT/target/release/slate-agent}"

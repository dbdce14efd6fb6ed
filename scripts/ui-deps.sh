#!/usr/bin/env bash
# Install what the web UI's browser test needs on Debian 12 (run as root): Debian's
# headless Chromium and its WebDriver, chromedriver. The test in
# crates/slate-server/tests/ui.rs finds them as /usr/bin/chromium and /usr/bin/chromedriver.
set -euo pipefail
need=()
for pkg in chromium chromium-driver fonts-dejavu-core; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v chromium >/dev/null && command -v chromedriver >/dev/null

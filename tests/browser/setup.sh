#!/usr/bin/env bash
# Installs what the console browser test (tests/console.rs) needs: Debian's Chromium and the
# pinned playwright-core in tests/browser/node_modules. Never downloads a browser from npm.
# Idempotent: does nothing when both are already there.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  apt-get install -y -qq chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq nodejs npm
fi
if [ ! -d node_modules/playwright-core ]; then
  # playwright-core ships no browser and downloads none.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
fi
/usr/bin/chromium --version

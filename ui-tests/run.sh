#!/usr/bin/env bash
# The dashboard's browser test: installs what is missing (Debian's chromium, playwright-core from
# package-lock.json), then drives `orchestrator serve --agents 1` on a fresh SQLite file through its pages.
# Usage: ui-tests/run.sh [path/to/orchestrator]   (default: target/debug/orchestrator, built when missing)
# Screenshots: target/ui-screenshots/*.png
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/orchestrator}
if [ ! -x "$bin" ]; then
  cargo build -p orchestrator
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "ui test: installing chromium"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
if ! command -v node >/dev/null 2>&1; then
  echo "ui test: node is missing (apt-get install -y nodejs npm)" >&2
  exit 1
fi
if [ ! -d ui-tests/node_modules/playwright-core ]; then
  (cd ui-tests && npm ci --no-audit --no-fund)
fi
exec timeout 300 node ui-tests/dashboard.test.mjs "$bin"

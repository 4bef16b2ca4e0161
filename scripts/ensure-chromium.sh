#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for tests/test_browser.py when they are missing.
# Idempotent and quiet (apt's output is shown only when it fails); needs root, as on CI.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-chromium: /usr/bin/chromium or /usr/bin/chromedriver is missing; run this script as root" >&2
    exit 1
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-chromium: apt-get could not install chromium and chromium-driver" >&2
    exit 1
fi

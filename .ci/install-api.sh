#!/usr/bin/env bash
# What tests/browser and tests/api need beyond the README's `pip install`: Debian's chromium and
# chromium-driver (the dashboard's real-browser test drives /usr/bin/chromium through
# /usr/bin/chromedriver) and prometheus (its promtool checks and unit-tests deploy/prometheus/rules.yaml).
# Idempotent and quiet.
set -euo pipefail

found() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
    && command -v promtool >/dev/null 2>&1; }
if found; then
    exit 0
fi

. "$(dirname "$0")/apt.sh"
apt_install chromium chromium-driver prometheus
found || { echo "install-api: chromium, chromedriver or promtool is missing after the install" >&2; exit 1; }

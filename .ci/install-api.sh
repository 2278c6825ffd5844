#!/usr/bin/env bash
# What tests/browser and tests/api need beyond `pip install -e '.[test]'`: Debian's chromium and
# chromium-driver (the dashboard's real-browser test drives /usr/bin/chromium through
# /usr/bin/chromedriver) and prometheus (its promtool checks and unit-tests deploy/prometheus/rules.yaml).
# Idempotent and quiet.
set -euo pipefail

found() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
    && command -v promtool >/dev/null 2>&1; }
if found; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
if ! apt-cache show chromium-driver >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
# In a container prometheus' own service does not start (no init); only promtool is used.
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver prometheus >/dev/null 2>&1 \
    || $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver prometheus >/dev/null
found || { echo "install-api: chromium, chromedriver or promtool is missing after the install" >&2; exit 1; }

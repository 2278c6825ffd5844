#!/usr/bin/env bash
# What tests/ingest needs beyond the README's `pip install`: a real Alertmanager (Debian's
# prometheus-alertmanager, 0.25) whose webhook receiver posts to the ingest. The tests start it
# themselves on a free loopback port with a generated config (tests/ingest/alertmanager.py); the
# package's own service is not used. Idempotent and quiet.
set -euo pipefail

found() { command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1; }
if found; then
    exit 0
fi

. "$(dirname "$0")/apt.sh"
apt_install prometheus-alertmanager
found || { echo "install-ingest: prometheus-alertmanager installed no alertmanager binary" >&2; exit 1; }

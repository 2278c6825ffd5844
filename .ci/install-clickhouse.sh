#!/usr/bin/env bash
# Installs Debian's clickhouse-server (18.16 on bookworm) for tests/lake. The tests start their own server
# from a fixture (temp dir, 127.0.0.1, free ports), so the packaged service is never started here.
set -euo pipefail
if command -v clickhouse-server >/dev/null 2>&1 || command -v clickhouse >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Keep the package's init script from starting a server on the default ports (9000/8123).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
install() { $SUDO apt-get install -y -qq --no-install-recommends clickhouse-server clickhouse-client >/dev/null; }
# Update the package index only when the install cannot proceed without it (another script may have run it).
install 2>/dev/null || { $SUDO apt-get update -qq && install; }

#!/usr/bin/env bash
# The Pub/Sub emulator for tests/pubsub and tests/bench/pubsub_bench.py: Debian package
# google-cloud-cli-pubsub-emulator (launcher .../bin/cloud-pubsub-emulator) and a Java runtime. The tests
# start it themselves on a free port (tests/pubsub/emulator.py); this only makes sure it is installed.
# Idempotent and quick when both are present.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
PACKAGE=google-cloud-cli-pubsub-emulator

launcher() { dpkg -L "$PACKAGE" 2>/dev/null | grep 'bin/cloud-pubsub-emulator$' | head -n 1; }

install() {  # by package name, updating the index only when the install cannot proceed without it
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

if ! command -v java >/dev/null 2>&1; then
    install default-jre-headless || { echo "install-pubsub: no Java runtime and default-jre-headless did not install" >&2; exit 1; }
fi
if [ -z "$(launcher)" ]; then
    if ! install "$PACKAGE"; then
        echo "install-pubsub: the Pub/Sub emulator is missing and apt cannot install $PACKAGE" \
             "(it comes from Google's Cloud SDK apt repository); tests/pubsub will fail in CI" >&2
        exit 1
    fi
fi
echo "pubsub emulator: $(launcher) ($(java -version 2>&1 | head -n 1))"

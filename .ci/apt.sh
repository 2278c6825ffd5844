#!/usr/bin/env bash
# Sourced by the .ci/install-*.sh scripts: apt_install PACKAGE... installs Debian packages quietly,
# refreshing the package lists only when they do not know the first package yet (another install script
# may have just updated them), and retrying once with the output shown. A package's own service does not
# start in a container (no init); the tests start what they need themselves.

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    if ! apt-cache show "$1" >/dev/null 2>&1; then
        $sudo apt-get update -qq
    fi
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
        || $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

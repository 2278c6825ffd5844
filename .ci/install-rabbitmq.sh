#!/usr/bin/env bash
# RabbitMQ for tests/rabbitmq: Debian's rabbitmq-server (3.10 on bookworm; quorum queues with message TTL
# and at-least-once dead-lettering need >= 3.10), started on 127.0.0.1:5672 with guest/guest.
# tests/rabbitmq/test_loss.py restarts the app with rabbitmqctl, so the server must be local.
set -euo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/5672") 2>/dev/null; }
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    install() { $SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null; }
    # Update the package index only when the install cannot proceed without it.
    install 2>/dev/null || { $SUDO apt-get update -qq && install; }
fi
if ! up; then
    $SUDO rabbitmq-server -detached || true
    for _ in $(seq 1 60); do up && break; sleep 1; done
fi
$SUDO rabbitmqctl await_startup >/dev/null

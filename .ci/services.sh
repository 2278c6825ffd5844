#!/usr/bin/env bash
# Makes sure the services the integration tests use are installed and running on loopback.
# Idempotent: a service already up is left alone. Each .ci/install-*.sh installs one area's extras.
set -euo pipefail
cd "$(dirname "$0")/.."

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! up 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
fi
if ! up 5672; then
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do up 5672 && break; sleep 1; done
fi

for script in .ci/install-*.sh; do
  [ -e "$script" ] || continue
  echo "== $script"
  bash "$script"
done

for port in 5432 5672; do
  up "$port" || { echo "service on 127.0.0.1:$port is not up" >&2; exit 1; }
done

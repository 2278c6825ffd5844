#!/usr/bin/env bash
# What tests/incidents needs beyond .ci/services.sh (which starts PostgreSQL): the `test` database the
# store tests use (each test run works in a schema of its own inside it). Idempotent and quiet.
set -euo pipefail

PSQL=(psql -h 127.0.0.1 -U postgres -d postgres -qtA)
for _ in $(seq 1 30); do
    "${PSQL[@]}" -c "SELECT 1" >/dev/null 2>&1 && break
    sleep 1
done
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" != "1" ]; then
    "${PSQL[@]}" -c "CREATE DATABASE test"
fi

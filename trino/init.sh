#!/bin/sh
# Entrypoint of the trino-init container: waits for Trino, then creates the table once. Trino's
# JDBC catalog works on the catalog tables the iceberg-sink creates when it first starts, so
# the creation is retried until they exist (the statement is idempotent), for up to 10 minutes.
set -eu
until trino --server http://trino:8080 --execute 'SELECT 1' >/dev/null 2>&1; do sleep 2; done
tries=0
until trino --server http://trino:8080 --file /etc/trino-init/init-tables.sql; do
  tries=$((tries + 1))
  if [ "$tries" -ge 300 ]; then
    echo "iceberg.default.weather not created after 10 minutes: is iceberg-sink running?" >&2
    exit 1
  fi
  echo "waiting for the iceberg-sink to create the catalog tables" >&2
  sleep 2
done
echo "iceberg.default.weather ready"

#!/bin/sh
# Entrypoint of the trino-init container: waits for Trino, then creates the table once.
set -eu
until trino --server http://trino:8080 --execute 'SELECT 1' >/dev/null 2>&1; do sleep 2; done
trino --server http://trino:8080 --file /etc/trino-init/init-tables.sql
echo "iceberg.default.weather ready"

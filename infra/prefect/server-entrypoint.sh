#!/bin/sh
# Prefect server (API + UI + scheduler) on PostgreSQL. Migrations run on start.
# Used by the `prefect-server` compose service and infra/native/systemd/detoxflow-prefect-server.service.
set -eu

: "${PREFECT_API_DATABASE_CONNECTION_URL:?set PREFECT_API_DATABASE_CONNECTION_URL, e.g. postgresql+asyncpg://user:password@postgres:5432/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"

exec prefect server start --host "${PREFECT_SERVER_HOST:-0.0.0.0}" --port "${PREFECT_SERVER_PORT:-4200}"

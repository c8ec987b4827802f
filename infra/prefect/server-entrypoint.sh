#!/bin/sh
# Prefect server (API + UI + scheduler) on PostgreSQL, with basic auth, CSRF protection and CORS limited to the
# UI's own origin (docs/team.md, "Security"). Migrations run on start.
# Used by the `prefect-server` compose service and infra/native/systemd/detoxflow-prefect-server.service.
set -eu

: "${PREFECT_API_DATABASE_CONNECTION_URL:?set PREFECT_API_DATABASE_CONNECTION_URL, e.g. postgresql+asyncpg://detoxflow_prefect:password@postgres:5432/prefect}"
: "${PREFECT_SERVER_API_AUTH_STRING:?set PREFECT_SERVER_API_AUTH_STRING to detoxflow:<DETOXFLOW_PREFECT_PASSWORD>}"
: "${PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS:?set PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS to the UI origin, e.g. http://127.0.0.1:4200}"
# Refuses a missing, placeholder (change-me...) or short secret, naming it.
python -m detoxflow.team.secrets PREFECT_SERVER_API_AUTH_STRING PREFECT_API_DATABASE_CONNECTION_URL
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED="${PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED:-true}"

exec prefect server start --host "${PREFECT_SERVER_HOST:-0.0.0.0}" --port "${PREFECT_SERVER_PORT:-4200}"

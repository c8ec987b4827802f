#!/bin/sh
# MLflow tracking server + model registry on PostgreSQL, artifacts proxied to S3 (MinIO) or a directory, behind
# MLflow's basic-auth app (every request needs a user; docs/team.md, "Security").
# Used by the `mlflow` compose service and by infra/native/systemd/detoxflow-mlflow.service.
# Clients need only the server URL and a user: artifacts travel through it (mlflow-artifacts:/ URIs), so only
# this process holds the bucket credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL).
# Secrets come from the environment only: `mlflow server` reads MLFLOW_BACKEND_STORE_URI itself, so no password
# is ever on a command line.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql+psycopg2://detoxflow_mlflow:password@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow or /var/lib/detoxflow/artifacts}"
# Refuses a missing, placeholder (change-me...) or short secret, naming it.
python -m detoxflow.team.secrets MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_BACKEND_STORE_URI
MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
# Host headers the server accepts: the compose service name first, or containers get HTTP 403.
MLFLOW_ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-mlflow:${MLFLOW_PORT},localhost:${MLFLOW_PORT},127.0.0.1:${MLFLOW_PORT},mlflow,localhost,127.0.0.1}"
# Origins a browser page may call the API from: the UI's own addresses.
MLFLOW_CORS_ALLOWED_ORIGINS="${MLFLOW_CORS_ALLOWED_ORIGINS:-http://127.0.0.1:${MLFLOW_PORT},http://localhost:${MLFLOW_PORT}}"
# The basic-auth app's user store (password hashes) and its ini (mode 0600).
MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-sqlite:////var/lib/detoxflow/mlflow-auth/basic_auth.db}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${HOME:-/tmp}/.mlflow-basic-auth.ini}"
umask 077
case "$MLFLOW_AUTH_DATABASE_URI" in sqlite:///*) mkdir -p "$(dirname "${MLFLOW_AUTH_DATABASE_URI#sqlite:///}")";; esac
python -c 'import os, sys; from detoxflow.team.auth import write_mlflow_auth_config as w; w(__import__("pathlib").Path(sys.argv[1]), os.environ["MLFLOW_AUTH_DATABASE_URI"])' \
  "$MLFLOW_AUTH_CONFIG_PATH"

# Job execution spawns ~2.2 GB of job workers that detoxflow never uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
export MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI

# Idempotent: creates the schema on an empty database, migrates it after an MLflow upgrade. `mlflow db upgrade`
# wants the URL as an argument, so its function is called with the URL from the environment instead.
python -c 'import os, mlflow.db as d; d.upgrade.callback(os.environ["MLFLOW_BACKEND_STORE_URI"])'

exec mlflow server \
  --app-name basic-auth \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "$MLFLOW_HOST" \
  --port "$MLFLOW_PORT" \
  --workers "${MLFLOW_WORKERS:-1}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
  --cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS"

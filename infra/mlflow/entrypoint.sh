#!/bin/sh
# MLflow tracking server + model registry on PostgreSQL, artifacts proxied to S3 (MinIO) or a directory.
# Used by the `mlflow` compose service and by infra/native/systemd/detoxflow-mlflow.service.
# Clients need only the server URL: artifacts travel through it (mlflow-artifacts:/ URIs), so only this
# process holds the bucket credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL).
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql+psycopg2://user:password@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow or /var/lib/detoxflow/artifacts}"
MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
# Host headers the server accepts: the compose service name first, or containers get HTTP 403.
MLFLOW_ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-mlflow:${MLFLOW_PORT},localhost:${MLFLOW_PORT},127.0.0.1:${MLFLOW_PORT},mlflow,localhost,127.0.0.1}"

# Job execution spawns ~2.2 GB of job workers that detoxflow never uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

# Idempotent: creates the schema on an empty database, migrates it after an MLflow upgrade.
mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"

exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "$MLFLOW_HOST" \
  --port "$MLFLOW_PORT" \
  --workers "${MLFLOW_WORKERS:-1}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"

#!/bin/sh
# A Prefect process worker for one work pool (DETOXFLOW_POOL: cpu or gpu). Flow runs start as subprocesses in
# the project folder, with this environment (PREFECT_API_URL, PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_URI,
# MLFLOW_TRACKING_USERNAME/PASSWORD, DETOXFLOW_LOCK_DB_URI). It refuses to run as root.
# Used by the worker-cpu / worker-gpu compose services and infra/native/systemd/detoxflow-worker@.service.
set -eu

: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://prefect-server:4200/api}"
: "${DETOXFLOW_POOL:?set DETOXFLOW_POOL to the work pool to serve: cpu or gpu}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI, e.g. http://mlflow:5000}"
# The servers require credentials (docs/team.md, "Security"); refused when missing, a placeholder or short.
python -m detoxflow.team.secrets PREFECT_API_AUTH_STRING MLFLOW_TRACKING_PASSWORD
# A flow run is a shell for whoever holds the Prefect credential: never root's. DETOXFLOW_ALLOW_ROOT_WORKER=1 is
# for throwaway test machines only (the test suite runs as root).
if [ "$(id -u)" = 0 ] && [ "${DETOXFLOW_ALLOW_ROOT_WORKER:-}" != 1 ]; then
  echo "error: the worker would run as root: run it as a dedicated user (compose: user 1000; systemd: User=detoxflow)" >&2
  exit 2
fi

# Flow runs inherit this: OpenMP threads that spin while they wait make torch several times slower when several
# flow runs (or training ranks) share the cores.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# The worker creates its pool (type process) when it does not exist yet; `detoxflow deploy` does the same.
exec prefect worker start \
  --pool "$DETOXFLOW_POOL" \
  --type process \
  --name "${DETOXFLOW_WORKER_NAME:-${DETOXFLOW_POOL}-$(hostname)}" \
  --install-policy never \
  --with-healthcheck

#!/bin/sh
# The native path's database setup (docker compose runs the same infra/postgres/roles.sql on an empty volume):
# roles detoxflow_mlflow and detoxflow_prefect, each owning its database (mlflow, prefect), and detoxflow_lock,
# which may only connect to mlflow (the gate's advisory lock), on an existing PostgreSQL 15+ server.
# Idempotent: a second run only resets the passwords (rotation).
#
#   sudo -u postgres env DETOXFLOW_PG_MLFLOW_PASSWORD=... DETOXFLOW_PG_PREFECT_PASSWORD=... \
#       DETOXFLOW_PG_LOCK_PASSWORD=... infra/native/setup-postgres.sh
#   (or: set -a; . /etc/detoxflow/detoxflow.env; set +a; infra/native/setup-postgres.sh)
#
# Connects with the usual libpq variables (PGHOST, PGPORT, PGUSER: a role allowed to create roles and
# databases). The passwords are read from the environment inside psql, so they never show in a process list.
set -eu

python3 - <<'PY' || exit 2
import os, sys
for name in ("DETOXFLOW_PG_MLFLOW_PASSWORD", "DETOXFLOW_PG_PREFECT_PASSWORD", "DETOXFLOW_PG_LOCK_PASSWORD"):
    v = os.environ.get(name, "")
    if not v or v.startswith("change-me") or len(v) < 16:
        sys.exit(f"error: {name} is missing, a change-me placeholder or shorter than 16 characters: "
                 "set it to a random value (openssl rand -hex 24)")
PY
psql -X -q -v ON_ERROR_STOP=1 -d postgres -f "$(dirname "$0")/../postgres/roles.sql"
echo "roles detoxflow_mlflow, detoxflow_prefect, detoxflow_lock and databases mlflow, prefect ready"

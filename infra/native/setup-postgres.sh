#!/bin/sh
# The native path's database setup (docker compose does the same with infra/postgres/init.sql): a login role
# and the databases prefect and mlflow, owned by it, on an existing PostgreSQL 15+ server. Idempotent: a
# second run only resets the password.
#
#   sudo -u postgres DETOXFLOW_DB_PASSWORD="$(openssl rand -hex 16)" infra/native/setup-postgres.sh
#
# Connects with the usual libpq variables (PGHOST, PGPORT, PGUSER: a role allowed to create roles and
# databases). The password is read from the environment inside psql, so it never shows in a process list.
set -eu

: "${DETOXFLOW_DB_PASSWORD:?set DETOXFLOW_DB_PASSWORD (URL-safe, e.g. openssl rand -hex 16)}"
export DETOXFLOW_DB_USER="${DETOXFLOW_DB_USER:-detoxflow}"

psql -X -q -v ON_ERROR_STOP=1 -d postgres <<'SQL'
\getenv db_user DETOXFLOW_DB_USER
\getenv db_password DETOXFLOW_DB_PASSWORD
SELECT format('CREATE ROLE %I LOGIN', :'db_user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'db_user') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'db_user', :'db_password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', d, :'db_user')
  FROM unnest(ARRAY['prefect', 'mlflow']) AS d
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d) \gexec
SQL
echo "role ${DETOXFLOW_DB_USER} and databases prefect, mlflow ready"

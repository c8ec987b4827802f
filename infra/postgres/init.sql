-- Runs once, when the postgres service starts on an empty volume (docker-entrypoint-initdb.d), as
-- $POSTGRES_USER. One database per server: Prefect's and MLflow's migrations never touch each other's tables.
-- The promotion gate's pg_advisory_lock (detoxflow/locks.py) is taken in the mlflow database.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;

-- The team stack's PostgreSQL roles and databases, least privilege (idempotent: a rerun resets the passwords,
-- so it also rotates them). Run by an administrator role with psql; the passwords come from the environment
-- (\getenv), so they never show in a process list:
--   DETOXFLOW_PG_MLFLOW_PASSWORD, DETOXFLOW_PG_PREFECT_PASSWORD, DETOXFLOW_PG_LOCK_PASSWORD
-- Used by `detoxflow serve team` (detoxflow/team/postgres.py), by compose (docker-entrypoint-initdb.d, through
-- infra/postgres/init.sh) and by infra/native/setup-postgres.sh.
--
-- detoxflow_mlflow   owns database mlflow (the MLflow server), nothing else; cannot connect to prefect
-- detoxflow_prefect  owns database prefect (the Prefect server), nothing else; cannot connect to mlflow
-- detoxflow_lock     may connect to mlflow and take advisory locks (the promotion gate); no table, no schema
\set ON_ERROR_STOP on
\getenv mlflow_pw DETOXFLOW_PG_MLFLOW_PASSWORD
\getenv prefect_pw DETOXFLOW_PG_PREFECT_PASSWORD
\getenv lock_pw DETOXFLOW_PG_LOCK_PASSWORD
SET client_min_messages = warning;

SELECT format('CREATE ROLE %I', r)
  FROM unnest(ARRAY['detoxflow_mlflow', 'detoxflow_prefect', 'detoxflow_lock']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE detoxflow_mlflow WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'mlflow_pw';
ALTER ROLE detoxflow_prefect WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'prefect_pw';
ALTER ROLE detoxflow_lock WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'lock_pw';

SELECT format('CREATE DATABASE %I OWNER %I', d, 'detoxflow_' || d)
  FROM unnest(ARRAY['prefect', 'mlflow']) AS d
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d) \gexec
ALTER DATABASE mlflow OWNER TO detoxflow_mlflow;
ALTER DATABASE prefect OWNER TO detoxflow_prefect;
-- Only the named roles may connect (PUBLIC may connect to every database by default).
REVOKE ALL ON DATABASE mlflow, prefect, postgres, template1 FROM PUBLIC;
GRANT CONNECT ON DATABASE mlflow TO detoxflow_lock;

-- Inside each database: its role owns the schema and every object (a stack created before these roles
-- existed has them owned by the administrator), and PUBLIC (so detoxflow_lock) gets nothing.
\connect mlflow
SET client_min_messages = warning;
ALTER SCHEMA public OWNER TO detoxflow_mlflow;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
SELECT format('ALTER %s %s OWNER TO detoxflow_mlflow',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             ELSE 'TABLE' END, c.oid::regclass)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
   AND c.relowner <> 'detoxflow_mlflow'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i', 'e')) \gexec
SELECT format('ALTER ROUTINE %s OWNER TO detoxflow_mlflow', p.oid::regprocedure)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND p.proowner <> 'detoxflow_mlflow'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e') \gexec
SELECT format('ALTER TYPE %s OWNER TO detoxflow_mlflow', t.oid::regtype)
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd') AND t.typowner <> 'detoxflow_mlflow'::regrole \gexec

\connect prefect
SET client_min_messages = warning;
ALTER SCHEMA public OWNER TO detoxflow_prefect;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
SELECT format('ALTER %s %s OWNER TO detoxflow_prefect',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             ELSE 'TABLE' END, c.oid::regclass)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
   AND c.relowner <> 'detoxflow_prefect'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i', 'e')) \gexec
SELECT format('ALTER ROUTINE %s OWNER TO detoxflow_prefect', p.oid::regprocedure)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND p.proowner <> 'detoxflow_prefect'::regrole
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e') \gexec
SELECT format('ALTER TYPE %s OWNER TO detoxflow_prefect', t.oid::regtype)
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd') AND t.typowner <> 'detoxflow_prefect'::regrole \gexec

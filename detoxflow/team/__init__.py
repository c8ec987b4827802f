"""Team mode without Docker: PostgreSQL, the MLflow server, the Prefect server and a worker per pool as plain
processes on 127.0.0.1 (the services of docker-compose.yml), and the Prefect administration a team needs.

One concern per module:

- :mod:`detoxflow.team.processes`: child processes (start in their own session, stop the whole group, wait until
  ready, run to completion), free and taken ports, the `mlflow` / `prefect` executables, :class:`TeamError`;
- :mod:`detoxflow.team.postgres`: the private PostgreSQL cluster (binaries, initdb, start/stop, databases);
- :mod:`detoxflow.team.prefect_admin`: work pools, the Prefect API URL, the project root, ``deploy_all``
  (`detoxflow deploy`) against whatever Prefect API ``PREFECT_API_URL`` names;
- :mod:`detoxflow.team.stack`: :class:`TeamStack` (everything started and stopped in dependency order; the
  integration tests use it too) and :func:`serve_team` (`detoxflow serve team`).
- :mod:`detoxflow.team.auth`: the servers' credentials (Prefect basic auth, CSRF, CORS; MLflow's basic-auth app
  and its users);
- :mod:`detoxflow.team.secrets`: the stack's secrets (generated, mode 0600, weak ones refused; doctor's check).

HTTP goes through :mod:`detoxflow.net`, shared with `detoxflow doctor`. The names below are the public API.
"""

from detoxflow.children import free_port
from detoxflow.net import http_get
from detoxflow.team.postgres import DATABASES, DB_USER, PostgresServer, postgres_bin_dir
from detoxflow.team.prefect_admin import DEFAULT_POOLS, deploy_all, ensure_pools, find_project_root, prefect_api_url
from detoxflow.team.processes import (
    ManagedProcess,
    TeamError,
    console_script,
    port_in_use,
    wait_until,
)
from detoxflow.team.stack import START_TIMEOUT_S, WORKER_STOP_GRACE_S, TeamPorts, TeamStack, serve_team

__all__ = [
    "DATABASES",
    "DB_USER",
    "DEFAULT_POOLS",
    "START_TIMEOUT_S",
    "WORKER_STOP_GRACE_S",
    "ManagedProcess",
    "PostgresServer",
    "TeamError",
    "TeamPorts",
    "TeamStack",
    "console_script",
    "deploy_all",
    "ensure_pools",
    "find_project_root",
    "free_port",
    "http_get",
    "port_in_use",
    "postgres_bin_dir",
    "prefect_api_url",
    "serve_team",
    "wait_until",
]

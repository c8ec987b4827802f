"""The team stack: PostgreSQL, the MLflow server, the Prefect server and a worker per pool as plain processes
on 127.0.0.1 (the services of docker-compose.yml), started and stopped in the right order.

:class:`TeamStack` is the one implementation; `detoxflow serve team` (:func:`serve_team`) and the integration
tests both use it, so what the tests prove is what a user runs.

Security (docs/team.md): secrets in ``<root>/secrets.env``, a client's exports in ``<root>/client.env`` (both
mode 0600, :mod:`detoxflow.team.secrets`); Prefect and MLflow require credentials (:mod:`detoxflow.team.auth`);
PostgreSQL roles own one database each; no password is ever in argv (environment or mode-0600 files only).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType, TracebackType

from detoxflow.children import free_port
from detoxflow.net import http_get
from detoxflow.paths import HOME_ENV, PROJECT_ROOT
from detoxflow.team import auth
from detoxflow.team.postgres import DB_USER, ROLES, PostgresServer
from detoxflow.team.prefect_admin import DEFAULT_POOLS, ensure_pools, prefect_api
from detoxflow.team.processes import (
    ManagedProcess,
    TeamError,
    console_script,
    port_in_use,
    run_command,
    wait_until,
)
from detoxflow.team.secrets import CLIENT_FILE, SECRETS_FILE, SECRETS_PATH_ENV, load_or_create, write_env_file

log = logging.getLogger("detoxflow.team")  # one logger name for the whole team stack
WORKER_USER_ENV = "DETOXFLOW_WORKER_USER"

# Two shared cores: importing mlflow or prefect alone can take 5-10 s there, a cold server start several times that.
START_TIMEOUT_S = 180.0
WORKER_STOP_GRACE_S = 4.0


@dataclass(frozen=True)
class TeamPorts:
    postgres: int = 55432
    mlflow: int = 5000
    prefect: int = 4200

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TeamPorts:
        e = os.environ if environ is None else environ
        d = cls()
        return cls(
            postgres=int(e.get("DETOXFLOW_POSTGRES_PORT", d.postgres)),
            mlflow=int(e.get("DETOXFLOW_MLFLOW_PORT", d.mlflow)),
            prefect=int(e.get("DETOXFLOW_PREFECT_PORT", d.prefect)),
        )

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> TeamPorts:
        return cls(postgres=free_port(host), mlflow=free_port(host), prefect=free_port(host))


def resolve_worker_user(worker_user: str | None) -> str | None:
    """Whom the workers run as. "auto": the caller, unless that is root; then ``$DETOXFLOW_WORKER_USER``
    (default ``detoxflow``), which must exist: a flow run is a shell for whoever holds the Prefect credential,
    so it must not be root's. None: the caller, even root (the test suite's stacks, which say so)."""
    if worker_user != "auto":
        return worker_user
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return None
    name = os.environ.get(WORKER_USER_ENV) or "detoxflow"
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise TeamError(f"the workers would run as root: create their user (useradd --system --create-home {name}) "
                        f"or set {WORKER_USER_ENV} to an unprivileged account") from None
    return name


class TeamStack:
    """PostgreSQL + MLflow server + Prefect server + one worker per pool, under `root`.

    Use as a context manager: entering starts everything (in dependency order), leaving stops everything
    (workers, Prefect, MLflow, then PostgreSQL). State (database, artifacts, logs) stays in `root`, so a
    second stack on the same root finds every run, model version and flow run again.

    `env` is what a client needs: the URLs, the Prefect and MLflow (detoxflow-worker) credentials and
    DETOXFLOW_LOCK_DB_URI; `start` writes it to ``<root>/client.env``."""

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        ports: TeamPorts | None = None,
        pools: Iterable[str] = DEFAULT_POOLS,
        workers: bool = True,
        ui: bool = True,
        fsync: bool = True,
        project_root: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        worker_query_seconds: float | None = None,
        worker_user: str | None = "auto",
    ) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.ports = ports or TeamPorts()
        self.pools = tuple(pools)
        self.with_workers = workers
        self.ui = ui
        self.project_root = project_root or PROJECT_ROOT
        self.extra_env = dict(extra_env or {})
        self.worker_query_seconds = worker_query_seconds
        self.worker_user = worker_user  # resolved when the workers start
        self.logs = self.root / "logs"
        self.artifacts = self.root / "artifacts"
        self.root.mkdir(parents=True, exist_ok=True)
        self.secrets = load_or_create(self.root, legacy_admin_password=self.root / "postgres.password")
        self.postgres = PostgresServer(
            data_dir=self.root / "postgres", host=host, port=self.ports.postgres,
            log_path=self.logs / "postgres.log", password=self.secrets["DETOXFLOW_PG_ADMIN_PASSWORD"], fsync=fsync,
        )
        self.mlflow: ManagedProcess | None = None
        self.prefect: ManagedProcess | None = None
        self.workers: dict[str, ManagedProcess] = {}
        self.timings: dict[str, float] = {}
        self._new_databases: set[str] = set()

    # -- addresses ------------------------------------------------------------------------------------------
    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.ports.prefect}/api"

    secrets_file = property(lambda self: self.root / SECRETS_FILE)
    client_file = property(lambda self: self.root / CLIENT_FILE)

    prefect_auth_string = property(lambda self: auth.prefect_auth_string(self.secrets["DETOXFLOW_PREFECT_PASSWORD"]))

    def role_url(self, role: str, database: str, driver: str = "psycopg2") -> str:  # holds a password: env only
        return self.postgres.url(database, driver, role, self.secrets[ROLES[role]])

    @property
    def env(self) -> dict[str, str]:
        """What a client (a shell, a worker, a test) exports to use this stack (secrets included)."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            **auth.prefect_client_env(self.prefect_auth_string),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": auth.MLFLOW_WORKER_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secrets[auth.MLFLOW_USERS[auth.MLFLOW_WORKER_USER]],
            # The gate's pg_advisory_lock (detoxflow/locks.py) lives in the MLflow database; its role may only connect.
            "DETOXFLOW_LOCK_DB_URI": self.role_url("detoxflow_lock", "mlflow"),
            SECRETS_PATH_ENV: str(self.secrets_file),
        }

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update({
            "PREFECT_HOME": str(self.root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    # -- services -------------------------------------------------------------------------------------------
    def start_postgres(self) -> None:
        self.timings["postgres"] = self.postgres.start()
        self._new_databases = self.postgres.ensure_roles(self.secrets)

    def _mlflow_schema_current(self) -> bool:
        """Whether `mlflow db upgrade` can be skipped: the database is new (the server creates the schema) or
        was last served by this very MLflow version. Saves ~8 s per start on two cores."""
        import importlib.metadata

        marker = self.root / "mlflow-schema.version"
        if "mlflow" in self._new_databases:
            return True
        return marker.is_file() and marker.read_text().strip() == importlib.metadata.version("mlflow")

    def _spawn_mlflow(self) -> None:
        if port_in_use(self.host, self.ports.mlflow):
            raise TeamError(f"MLflow: port {self.ports.mlflow} on {self.host} is taken: stop what listens there "
                            "or set DETOXFLOW_MLFLOW_PORT")
        auth_ini, auth_db = self.root / "mlflow-auth.ini", self.root / "mlflow-auth.db"
        os.close(os.open(auth_db, os.O_WRONLY | os.O_CREAT, 0o600))  # password hashes: SQLite keeps the mode
        auth_db.chmod(0o600)
        auth.write_mlflow_auth_config(auth_ini, f"sqlite:///{auth_db}")
        env = {
            **self._base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # `mlflow server` reads its store from here, so the password is in no argv
            "MLFLOW_BACKEND_STORE_URI": self.role_url("detoxflow_mlflow", "mlflow"),
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        }
        if not self._mlflow_schema_current():
            self.upgrade_mlflow_schema(env)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        hosts = f"{self.host},{self.host}:{self.ports.mlflow},localhost,localhost:{self.ports.mlflow}"
        origins = f"{self.mlflow_url},http://localhost:{self.ports.mlflow}"
        self.mlflow = ManagedProcess(
            "mlflow",
            [console_script("mlflow"), "server", "--app-name", "basic-auth", "--serve-artifacts",
             "--artifacts-destination", self.artifacts.as_uri(), "--host", self.host, "--port", str(self.ports.mlflow),
             "--workers", "1", "--allowed-hosts", hosts, "--cors-allowed-origins", origins],
            env, self.root, self.logs / "mlflow.log",
        )
        self.mlflow.start()

    def upgrade_mlflow_schema(self, env: Mapping[str, str]) -> None:
        """`mlflow db upgrade` (the server refuses an outdated schema). It takes the URL as an argument, so its
        function is called with the URL from `env` instead: the password stays out of argv."""
        run_command([sys.executable, "-c", "import os, mlflow.db as d; "
                     "d.upgrade.callback(os.environ['MLFLOW_BACKEND_STORE_URI'])"], "mlflow db upgrade", env=env)

    def _wait_mlflow(self) -> None:
        import importlib.metadata

        assert self.mlflow is not None
        wait_until(lambda: http_get(f"{self.mlflow_url}/health")[0] == 200, "MLflow server", START_TIMEOUT_S, self.mlflow)
        auth.ensure_mlflow_users(self.mlflow_url, self.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"],
                                 {user: self.secrets[name] for user, name in auth.MLFLOW_USERS.items()})
        (self.root / "mlflow-schema.version").write_text(importlib.metadata.version("mlflow") + "\n")

    def _spawn_prefect(self) -> None:
        if port_in_use(self.host, self.ports.prefect):
            raise TeamError(f"Prefect: port {self.ports.prefect} on {self.host} is taken: stop what listens there "
                            "or set DETOXFLOW_PREFECT_PORT")
        env = {
            **self._base_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.role_url("detoxflow_prefect", "prefect", "asyncpg"),
            "PREFECT_UI_API_URL": self.prefect_api_url,
            **auth.prefect_server_env(self.prefect_auth_string, self.prefect_api_url.removesuffix("/api")),
        }
        self.prefect = ManagedProcess(
            "prefect-server",
            [console_script("prefect"), "server", "start", "--host", self.host, "--port", str(self.ports.prefect),
             "--ui" if self.ui else "--no-ui", "--analytics-off"],
            env, self.root, self.logs / "prefect-server.log",
        )
        self.prefect.start()

    def _wait_prefect(self) -> None:
        assert self.prefect is not None
        wait_until(lambda: http_get(f"{self.prefect_api_url}/health")[0] == 200, "Prefect server", START_TIMEOUT_S,
                   self.prefect)

    def start_mlflow(self) -> None:
        t0 = time.monotonic()
        self._spawn_mlflow()
        self._wait_mlflow()
        self.timings["mlflow"] = time.monotonic() - t0

    def start_prefect(self) -> None:
        t0 = time.monotonic()
        self._spawn_prefect()
        self._wait_prefect()
        self.timings["prefect"] = time.monotonic() - t0

    def start_servers(self) -> None:
        """MLflow and Prefect need only PostgreSQL, so they start side by side."""
        t0 = time.monotonic()
        self._spawn_mlflow()
        self._spawn_prefect()
        self._wait_prefect()
        self.timings["prefect"] = time.monotonic() - t0
        self._wait_mlflow()
        self.timings["mlflow"] = time.monotonic() - t0

    def worker_env(self) -> dict[str, str]:
        env = {**self._base_env(), **self.env}
        # flow runs (and training ranks) share the cores: OpenMP threads that spin while waiting starve them
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.worker_query_seconds is not None:
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(self.worker_query_seconds)
        return env

    def _worker_home(self, pool: str) -> dict[str, str]:
        """Both workers keep detoxflow's state in ``<root>/work``, their ``DETOXFLOW_HOME`` (compose: the ``work``
        volume); run as `worker_user`, each also gets its own HOME and PREFECT_HOME, all owned by that user."""
        work, home = self.root / "work", self.root / f"worker-home-{pool}"
        work.mkdir(mode=0o750, exist_ok=True)
        if self.worker_user is None:
            return {HOME_ENV: str(work)}
        home.mkdir(mode=0o700, exist_ok=True)
        for folder in (work, home):
            shutil.chown(folder, self.worker_user, pwd.getpwnam(self.worker_user).pw_gid)
        return {HOME_ENV: str(work), "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "USER": self.worker_user}

    def start_workers(self) -> None:
        t0 = time.monotonic()
        self.worker_user = resolve_worker_user(self.worker_user)
        ensure_pools(self.prefect_api_url, self.pools, auth_string=self.prefect_auth_string)
        for pool in self.pools:
            proc = ManagedProcess(
                f"worker-{pool}",
                [console_script("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                 "--name", f"{pool}-{socket.gethostname()}-{self.ports.prefect}", "--install-policy", "never"],
                {**self.worker_env(), "DETOXFLOW_POOL": pool, **self._worker_home(pool)}, self.project_root,
                self.logs / f"worker-{pool}.log", user=self.worker_user,
            )
            proc.start()
            self.workers[pool] = proc
        # A restarted worker keeps its name, so only a heartbeat newer than this start counts as "up".
        since = datetime.now(UTC) - timedelta(seconds=1)
        for pool, proc in self.workers.items():
            wait_until(lambda p=pool: self.pool_has_online_worker(p, since), f"Prefect worker for pool '{pool}'",
                       START_TIMEOUT_S, proc)
        self.timings["workers"] = time.monotonic() - t0

    def pool_has_online_worker(self, pool: str, since: datetime | None = None) -> bool:
        status, body = prefect_api(self.prefect_api_url, "POST", f"work_pools/{pool}/workers/filter", {},
                                   auth_string=self.prefect_auth_string)
        if status != 200 or not isinstance(body, list):
            return False
        for w in body:
            beat = w.get("last_heartbeat_time")
            if w.get("status") != "ONLINE" or not beat:
                continue
            if since is None or datetime.fromisoformat(beat.replace("Z", "+00:00")) >= since:
                return True
        return False

    def stop_workers(self) -> None:
        # In parallel and with a short grace: a worker that has run flows ignores SIGTERM (and often SIGINT),
        # and holds no state of its own; flow runs it started die with its process group.
        with ThreadPoolExecutor(max_workers=max(1, len(self.workers))) as pool:
            list(pool.map(lambda proc: proc.stop(grace=WORKER_STOP_GRACE_S), self.workers.values()))
        self.workers.clear()

    def stop_servers(self) -> None:
        """Workers first (they would otherwise crash-loop against a missing API), then Prefect, then MLflow."""
        self.stop_workers()
        for proc in (self.prefect, self.mlflow):
            if proc is not None:
                proc.stop()
        self.prefect = self.mlflow = None

    def start(self) -> TeamStack:
        t0 = time.monotonic()
        try:
            self.start_postgres()
            self.start_servers()
            write_env_file(self.client_file, self.env, "detoxflow team stack: `source` this file to use the stack "
                           "(mode 0600: it holds credentials)")
            if self.with_workers:
                self.start_workers()
            else:
                ensure_pools(self.prefect_api_url, self.pools, auth_string=self.prefect_auth_string)
        except BaseException:
            try:
                self.stop()
            except Exception:  # noqa: BLE001 - the start failure is the error to report
                log.exception("while stopping after a failed start")
            raise
        self.timings["total"] = time.monotonic() - t0
        log.info("team stack up in %.1f s: %s", self.timings["total"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if k != "total"))
        return self

    def stop(self) -> None:
        errors = []
        try:
            self.stop_servers()
        except Exception as e:  # noqa: BLE001 - PostgreSQL must still be stopped
            errors.append(e)
        try:
            self.postgres.stop()
        except TeamError as e:
            errors.append(e)
        if errors:
            raise TeamError("; ".join(str(e) for e in errors))

    def restart_all(self) -> None:
        """Stop every process including PostgreSQL, then start them all again on the same root."""
        self.stop()
        self.start()

    def dead(self) -> list[ManagedProcess]:
        procs = [p for p in (self.mlflow, self.prefect, *self.workers.values()) if p is not None]
        return [p for p in procs if not p.alive()]

    def __enter__(self) -> TeamStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def banner(stack: TeamStack) -> list[str]:
    """What `serve team` prints once up: addresses and where the env files are, never a secret."""
    return [f"team stack up in {stack.timings['total']:.0f} s (state in {stack.root})",
            f"  Prefect UI/API  {stack.prefect_api_url.removesuffix('/api')}", f"  MLflow          {stack.mlflow_url}",
            f"  PostgreSQL      {stack.host}:{stack.ports.postgres} (administrator {DB_USER})",
            f"  workers         pools {', '.join(stack.pools)}; logs in {stack.logs}",
            f"  secrets         {stack.secrets_file} (mode 0600; UI logins: docs/team.md, Security)",
            "In another shell:", f"  . {stack.client_file}",
            "  detoxflow deploy   # pools + deployments of prefect.yaml;  detoxflow doctor   # check",
            "Ctrl-C stops everything."]


def serve_team(root: Path, ports: TeamPorts | None = None) -> None:
    """`detoxflow serve team`: start the stack under `root`, print URLs and exports, run until Ctrl-C."""
    from rich.console import Console

    console = Console(stderr=True)
    stack = TeamStack(Path(root), ports=ports or TeamPorts.from_env(), ui=True)

    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM (systemd, kill) stops in the same order as Ctrl-C

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with console.status("starting PostgreSQL, MLflow, Prefect and the workers (first start ~1 min)..."):
            stack.start()
        try:
            for line in banner(stack):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            while True:
                dead = stack.dead()
                if dead:
                    p = dead[0]
                    raise TeamError(f"{p.name} exited (code {p.returncode}); last log lines ({p.log_path}):\n{p.tail()}")
                time.sleep(1.0)
        except KeyboardInterrupt:
            console.print("stopping: workers, Prefect, MLflow, PostgreSQL...")
        finally:
            stack.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)

"""Team mode without Docker: PostgreSQL, the MLflow server, the Prefect server and a worker per pool as plain
processes on 127.0.0.1 — the services of docker-compose.yml, started and stopped in the right order.

`TeamStack` is the one implementation; `detoxflow serve team` (:func:`serve_team`) and the integration tests
both use it, so what the tests prove is what a user runs. `deploy_all` creates the work pools and registers
the deployments of prefect.yaml against whatever Prefect API ``PREFECT_API_URL`` names.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType, TracebackType

from detoxflow.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

DEFAULT_POOLS: tuple[str, ...] = ("cpu", "gpu")
DATABASES: tuple[str, ...] = ("prefect", "mlflow")
DB_USER = "detoxflow"
# Two shared cores: importing mlflow or prefect alone can take 5-10 s there, a cold server start several times that.
START_TIMEOUT_S = 180.0
WORKER_STOP_GRACE_S = 4.0


class TeamError(RuntimeError):
    """The team stack could not start or act; the message names the service and what to do."""


# --------------------------------------------------------------------------------------------- small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answered. Never raises for network errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - URLs are the stack's own
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, ""


def console_script(name: str) -> str:
    """The `mlflow` / `prefect` executable of this interpreter's environment, so a venv need not be activated."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise TeamError(f"'{name}' is not installed in this environment: pip install 'detoxflow[team]'")
    return found


def postgres_bin_dir() -> Path:
    """Where initdb / pg_ctl live: $DETOXFLOW_PG_BIN, then PATH, then Debian's /usr/lib/postgresql/<ver>/bin."""
    env = os.environ.get("DETOXFLOW_PG_BIN")
    if env:
        return Path(env)
    on_path = shutil.which("pg_ctl")
    if on_path:
        # Debian links initdb/pg_ctl into /usr/local/bin but not psql/createdb: follow the link to the full set.
        return Path(on_path).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    if candidates:
        return candidates[0].parent
    raise TeamError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install PostgreSQL 15+ "
        "(Debian: apt-get install postgresql) or set DETOXFLOW_PG_BIN to the folder holding pg_ctl"
    )


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def wait_until(check: Callable[[], bool], what: str, timeout: float, proc: ManagedProcess | None = None) -> float:
    """Poll `check` until it holds; returns the seconds it took. Fails fast, with the log tail, if `proc` dies."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        if proc is not None and not proc.alive():
            raise TeamError(f"{what}: the process exited with code {proc.returncode}. Last log lines "
                            f"({proc.log_path}):\n{proc.tail()}")
        time.sleep(0.25)
    tail = f"\nLast log lines ({proc.log_path}):\n{proc.tail()}" if proc is not None else ""
    raise TeamError(f"{what}: not ready after {timeout:.0f} s.{tail}")


# --------------------------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """A long-running child in its own session (so signals reach its children too), logging to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        log.info("%s: started (pid %s), log %s", self.name, self.proc.pid, self.log_path)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGINT, then SIGKILL to the whole process group.

        A Prefect worker that has run flows can ignore SIGTERM (measured), and Prefect's server exits cleanly
        on SIGINT; killing the group also ends flow-run subprocesses a worker started."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGINT, grace / 2), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                log.warning("%s: still running %.0f s after %s", self.name, wait_s, sig.name)
        # Children that outlived their leader (uvicorn workers, flow runs) share the group.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log.info("%s: stopped (exit %s)", self.name, self.proc.returncode)
        self.proc = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _run(argv: list[str], what: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 300.0) -> str:
    """Run a command to completion; on failure raise TeamError with its output."""
    try:
        res = subprocess.run(argv, env=dict(env) if env is not None else None, cwd=cwd, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise TeamError(f"{what}: timed out after {timeout:.0f} s ({' '.join(argv)})") from e
    if res.returncode != 0:
        raise TeamError(f"{what} failed (exit {res.returncode}): {' '.join(argv)}\n{res.stdout}{res.stderr}".rstrip())
    return res.stdout


# --------------------------------------------------------------------------------------------- PostgreSQL


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster in `data_dir`, TCP on host:port only, password auth over TCP.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` system user."""

    data_dir: Path
    host: str
    port: int
    log_path: Path
    password_file: Path
    fsync: bool = True
    user: str = DB_USER

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if _running_as_root() else argv

    def _bin(self, name: str) -> str:
        return str(postgres_bin_dir() / name)

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """SQLAlchemy URL: Prefect wants `asyncpg`; MLflow `psycopg2` (SQLAlchemy 2.1 otherwise looks for psycopg 3)."""
        return f"postgresql+{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}

    def init(self) -> None:
        """initdb once; the password is generated here and kept beside the cluster (mode 0600)."""
        if self.initialised:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise TeamError(f"{self.data_dir} is not empty but holds no PostgreSQL cluster: remove it or pick another root")
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_hex(16) + "\n")
        self.password_file.chmod(0o600)
        if _running_as_root():
            self._check_reachable_by_postgres()
            shutil.chown(self.data_dir, "postgres", "postgres")
            shutil.chown(self.password_file, "postgres", "postgres")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.touch()
            shutil.chown(self.log_path, "postgres", "postgres")
        _run(self._as_owner([
            self._bin("initdb"), "-D", str(self.data_dir), "-U", self.user, f"--pwfile={self.password_file}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
        ]), "initdb")
        # TCP on the given host only, no Unix socket: its path limit (107 bytes) breaks deep roots.
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# detoxflow team stack\nunix_socket_directories = ''\nmax_connections = 200\n")

    def _check_reachable_by_postgres(self) -> None:
        res = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.data_dir.parent)],
                             capture_output=True)
        if res.returncode != 0:
            raise TeamError(
                f"PostgreSQL runs as the 'postgres' user (initdb refuses root) and cannot enter {self.data_dir.parent}: "
                "pick a root under a folder others may traverse, or `chmod o+x` the folders above it"
            )

    def start(self) -> float:
        """Start the cluster (pg_ctl -w waits until it accepts connections); returns seconds taken."""
        if port_in_use(self.host, self.port):
            raise TeamError(f"PostgreSQL: port {self.port} on {self.host} is taken: stop what listens there "
                            "or set DETOXFLOW_POSTGRES_PORT")
        self.init()
        opts = f"-p {self.port} -c listen_addresses={self.host}" + ("" if self.fsync else " -c fsync=off")
        t0 = time.monotonic()
        _run(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-o", opts,
                             "-w", "-t", "120", "start"]), f"PostgreSQL start (log {self.log_path})")
        return time.monotonic() - t0

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        _run(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"]),
             "PostgreSQL stop")

    def ensure_database(self, name: str) -> bool:
        """Create the database unless it exists; True when it was created now."""
        base = [self._bin("psql"), "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres"]
        exists = _run([*base, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
                      f"PostgreSQL: look up database {name}", env=self._client_env())
        if exists.strip() == "1":
            return False
        _run([self._bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
             f"PostgreSQL: create database {name}", env=self._client_env())
        return True


# --------------------------------------------------------------------------------------------- Prefect pools


def _prefect_api(api_url: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    import json

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{api_url.rstrip('/')}/{path.lstrip('/')}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        raise TeamError(f"Prefect API {api_url} unreachable ({e}): start it (detoxflow serve team, or "
                        "docker compose up -d) and check PREFECT_API_URL") from e


def ensure_pools(api_url: str, pools: Iterable[str] = DEFAULT_POOLS, pool_type: str = "process") -> list[str]:
    """Create each work pool that does not exist yet (process type, Prefect's default job template).

    Returns the names created. Existing pools are left as they are: an operator may have tuned them."""
    from prefect.workers.process import ProcessWorker

    created = []
    for name in pools:
        status, _ = _prefect_api(api_url, "GET", f"work_pools/{name}")
        if status == 200:
            continue
        if status != 404:
            raise TeamError(f"Prefect API {api_url}: reading work pool '{name}' answered HTTP {status}")
        template = ProcessWorker.get_default_base_job_template() if pool_type == "process" else {}
        status, body = _prefect_api(api_url, "POST", "work_pools/",
                                    {"name": name, "type": pool_type, "base_job_template": template})
        if status not in (200, 201, 409):  # 409: another process created it meanwhile, which is fine
            raise TeamError(f"Prefect API {api_url}: creating work pool '{name}' answered HTTP {status}: {body}")
        created.append(name)
        log.info("work pool '%s' (%s) created", name, pool_type)
    return created


def prefect_api_url() -> str:
    """PREFECT_API_URL from the environment, else the active Prefect profile's; TeamError if neither."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        try:
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
        except Exception:  # noqa: BLE001 - a broken profile is reported the same way as no profile
            url = None
    if not url:
        raise TeamError("PREFECT_API_URL is not set: export PREFECT_API_URL=http://127.0.0.1:4200/api "
                        "(the URL `detoxflow serve team` or `docker compose up -d` gives you)")
    return url.rstrip("/")


def find_project_root(start: Path | None = None) -> Path:
    """The folder holding prefect.yaml: the current folder or one above it, else the source checkout."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "prefect.yaml").is_file():
            return folder
    if (PROJECT_ROOT / "prefect.yaml").is_file():
        return PROJECT_ROOT
    raise TeamError(f"no prefect.yaml in {here} or above it: run `detoxflow deploy` from the detoxflow project folder")


def deploy_all(project_root: Path | None = None, pools: Iterable[str] = DEFAULT_POOLS,
               env: Mapping[str, str] | None = None) -> list[str]:
    """Create the work pools (if absent) and run `prefect deploy --all --no-prompt` from the project root.

    Entry points in prefect.yaml are relative to the project root, so the deploy must run there. Returns the
    'flow/deployment' names Prefect reported as created or updated."""
    run_env = {**os.environ, **(env or {})}
    api = run_env.get("PREFECT_API_URL") or prefect_api_url()
    run_env["PREFECT_API_URL"] = api
    status, _ = http_get(f"{api}/health")
    if status != 200:
        raise TeamError(f"Prefect API {api} is not healthy (HTTP {status or 'no answer'}): start the server "
                        "(detoxflow serve team, or docker compose up -d) or fix PREFECT_API_URL")
    root = project_root or find_project_root()
    ensure_pools(api, pools)
    log.info("prefect deploy --all from %s against %s", root, api)
    out = _run([console_script("prefect"), "--no-prompt", "deploy", "--all"], "prefect deploy --all", env=run_env,
               cwd=root, timeout=600)
    names = re.findall(r"Deployment '([^']+)' successfully", re.sub(r"[│\s]+", " ", out))
    log.info("%d deployment(s) registered at %s: %s", len(names), api, ", ".join(names) or "(none reported)")
    return names


# --------------------------------------------------------------------------------------------- the stack


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


class TeamStack:
    """PostgreSQL + MLflow server + Prefect server + one worker per pool, under `root`.

    Use as a context manager: entering starts everything (in dependency order), leaving stops everything
    (workers, Prefect, MLflow, then PostgreSQL). State (database, artifacts, logs) stays in `root`, so a
    second stack on the same root finds every run, model version and flow run again.

    `env` is what a client needs: PREFECT_API_URL, MLFLOW_TRACKING_URI, DETOXFLOW_LOCK_DB_URI."""

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
        self.logs = self.root / "logs"
        self.artifacts = self.root / "artifacts"
        self.postgres = PostgresServer(
            data_dir=self.root / "postgres", host=host, port=self.ports.postgres,
            log_path=self.logs / "postgres.log", password_file=self.root / "postgres.password", fsync=fsync,
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

    @property
    def env(self) -> dict[str, str]:
        """What a client (a shell, a worker, a test) exports to use this stack."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # The gate's pg_advisory_lock (detoxflow/locks.py) lives in the MLflow database.
            "DETOXFLOW_LOCK_DB_URI": self.postgres.url("mlflow"),
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
        self._new_databases = {db for db in DATABASES if self.postgres.ensure_database(db)}

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
        url = self.postgres.url("mlflow", "psycopg2")
        env = {**self._base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if not self._mlflow_schema_current():
            # Migrates an existing database to the installed MLflow; the server refuses an outdated schema.
            _run([console_script("mlflow"), "db", "upgrade", url], "mlflow db upgrade", env=env)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        hosts = f"{self.host},{self.host}:{self.ports.mlflow},localhost,localhost:{self.ports.mlflow}"
        self.mlflow = ManagedProcess(
            "mlflow",
            [console_script("mlflow"), "server", "--backend-store-uri", url, "--serve-artifacts",
             "--artifacts-destination", self.artifacts.as_uri(), "--host", self.host, "--port", str(self.ports.mlflow),
             "--workers", "1", "--allowed-hosts", hosts],
            env, self.root, self.logs / "mlflow.log",
        )
        self.mlflow.start()

    def _wait_mlflow(self) -> None:
        import importlib.metadata

        assert self.mlflow is not None
        wait_until(lambda: http_get(f"{self.mlflow_url}/health")[0] == 200, "MLflow server", START_TIMEOUT_S, self.mlflow)
        (self.root / "mlflow-schema.version").write_text(importlib.metadata.version("mlflow") + "\n")

    def _spawn_prefect(self) -> None:
        if port_in_use(self.host, self.ports.prefect):
            raise TeamError(f"Prefect: port {self.ports.prefect} on {self.host} is taken: stop what listens there "
                            "or set DETOXFLOW_PREFECT_PORT")
        env = {
            **self._base_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.postgres.url("prefect", "asyncpg"),
            "PREFECT_UI_API_URL": self.prefect_api_url,
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

    def start_workers(self) -> None:
        t0 = time.monotonic()
        ensure_pools(self.prefect_api_url, self.pools)
        for pool in self.pools:
            proc = ManagedProcess(
                f"worker-{pool}",
                [console_script("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                 "--name", f"{pool}-{socket.gethostname()}-{self.ports.prefect}", "--install-policy", "never"],
                {**self.worker_env(), "DETOXFLOW_POOL": pool}, self.project_root, self.logs / f"worker-{pool}.log",
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
        status, body = _prefect_api(self.prefect_api_url, "POST", f"work_pools/{pool}/workers/filter", {})
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
        threads = [threading.Thread(target=proc.stop, kwargs={"grace": WORKER_STOP_GRACE_S})
                   for proc in self.workers.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
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
            if self.with_workers:
                self.start_workers()
            else:
                ensure_pools(self.prefect_api_url, self.pools)
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

    def restart_servers(self) -> None:
        """Stop and start MLflow and Prefect (and the workers): state must come back from PostgreSQL."""
        self.stop_servers()
        self.start_servers()
        if self.with_workers:
            self.start_workers()

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


def _exports(env: Mapping[str, str]) -> str:
    return "\n".join(f"export {k}='{v}'" for k, v in env.items())


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
            console.print(f"[bold green]team stack up[/] in {stack.timings['total']:.0f} s (state in {stack.root})")
            console.print(f"  Prefect UI/API  {stack.prefect_api_url.removesuffix('/api')}")
            console.print(f"  MLflow          {stack.mlflow_url}")
            console.print(f"  PostgreSQL      {stack.host}:{stack.ports.postgres} (user {DB_USER}, password in "
                          f"{stack.postgres.password_file})")
            console.print(f"  workers         pools {', '.join(stack.pools)}; logs in {stack.logs}")
            console.print("In another shell:")
            console.print(_exports(stack.env), markup=False, highlight=False)
            console.print("  detoxflow deploy   # pools + deployments of prefect.yaml;  detoxflow doctor   # check")
            console.print("Ctrl-C stops everything.")
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

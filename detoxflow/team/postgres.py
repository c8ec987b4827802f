"""A private PostgreSQL cluster for the team stack: find the server binaries, initdb once (as the `postgres`
user when running as root), start and stop it on one TCP port, create its roles and databases.

Roles and databases come from ``infra/postgres/roles.sql`` (the one definition, shared with compose and the
native setup script): ``detoxflow_mlflow`` and ``detoxflow_prefect`` each own one database, ``detoxflow_lock``
may only connect to ``mlflow`` (advisory locks). The administrator (`DB_USER`) is used for administration only.
Passwords reach psql and initdb through the environment and a mode-0600 file, never through argv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from detoxflow.paths import PROJECT_ROOT
from detoxflow.team.processes import TeamError, port_in_use, run_command

DATABASES: tuple[str, ...] = ("prefect", "mlflow")
DB_USER = "detoxflow"
# role -> the secret (detoxflow.team.secrets) holding its password; roles.sql reads them by these names.
ROLES: dict[str, str] = {
    "detoxflow_mlflow": "DETOXFLOW_PG_MLFLOW_PASSWORD",
    "detoxflow_prefect": "DETOXFLOW_PG_PREFECT_PASSWORD",
    "detoxflow_lock": "DETOXFLOW_PG_LOCK_PASSWORD",
}
ROLES_SQL = PROJECT_ROOT / "infra" / "postgres" / "roles.sql"


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


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster in `data_dir`, TCP on host:port only, password auth over TCP.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` system user."""

    data_dir: Path
    host: str
    port: int
    log_path: Path
    password: str = field(repr=False)
    fsync: bool = True
    user: str = DB_USER

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if _running_as_root() else argv

    def _bin(self, name: str) -> str:
        return str(postgres_bin_dir() / name)

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def url(self, database: str, driver: str = "psycopg2", role: str | None = None, password: str | None = None) -> str:
        """SQLAlchemy URL as `role` (default: the administrator): Prefect wants `asyncpg`; MLflow `psycopg2`
        (SQLAlchemy 2.1 otherwise looks for psycopg 3). Holds a password: pass it in the environment only."""
        user, pw = (self.user, self.password) if role is None else (role, password)
        return f"postgresql+{driver}://{user}:{pw}@{self.host}:{self.port}/{database}"

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}

    def init(self) -> None:
        """initdb once, the administrator's password passed in a mode-0600 file removed right after."""
        if self.initialised:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise TeamError(f"{self.data_dir} is not empty but holds no PostgreSQL cluster: remove it or pick another root")
        pwfile = self.data_dir.parent / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        try:
            if _running_as_root():
                self._check_reachable_by_postgres()
                shutil.chown(self.data_dir, "postgres", "postgres")
                shutil.chown(pwfile, "postgres", "postgres")
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self.log_path.touch()
                shutil.chown(self.log_path, "postgres", "postgres")
            run_command(self._as_owner([
                self._bin("initdb"), "-D", str(self.data_dir), "-U", self.user, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
            ]), "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
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
        run_command(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-o", opts,
                             "-w", "-t", "120", "start"]), f"PostgreSQL start (log {self.log_path})")
        return time.monotonic() - t0

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        run_command(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"]),
             "PostgreSQL stop")

    def ensure_roles(self, passwords: Mapping[str, str]) -> set[str]:
        """Create or update the roles and databases of roles.sql (`passwords`: secret name -> value, see
        `ROLES`); returns the databases created now."""
        base = [self._bin("psql"), "-X", "-q", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres"]
        existing = run_command([*base, "-tAc", "SELECT datname FROM pg_database"], "PostgreSQL: list databases",
                               env=self._client_env()).split()
        env = {**self._client_env(), **{name: passwords[name] for name in ROLES.values()}}
        run_command([*base, "-f", str(ROLES_SQL)], f"PostgreSQL: roles and databases ({ROLES_SQL.name})", env=env)
        return {db for db in DATABASES if db not in existing}

"""A private PostgreSQL cluster for the team stack: find the server binaries, initdb once (as the `postgres`
user when running as root), start and stop it on one TCP port, create its databases.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from detoxflow.team.processes import TeamError, port_in_use, run_command

DATABASES: tuple[str, ...] = ("prefect", "mlflow")
DB_USER = "detoxflow"


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
        run_command(self._as_owner([
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
        run_command(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-o", opts,
                             "-w", "-t", "120", "start"]), f"PostgreSQL start (log {self.log_path})")
        return time.monotonic() - t0

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        run_command(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"]),
             "PostgreSQL stop")

    def ensure_database(self, name: str) -> bool:
        """Create the database unless it exists; True when it was created now."""
        base = [self._bin("psql"), "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres"]
        exists = run_command([*base, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
                      f"PostgreSQL: look up database {name}", env=self._client_env())
        if exists.strip() == "1":
            return False
        run_command([self._bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
             f"PostgreSQL: create database {name}", env=self._client_env())
        return True

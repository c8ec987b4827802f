"""The team stack's secrets: generated once, kept in a mode-0600 env file, refused when weak.

- :func:`load_or_create` reads ``<root>/secrets.env`` (the native stack's secrets) or creates it with random
  values on the first `detoxflow serve team`; a value missing from an older file is added.
- :func:`validate` refuses a secret that equals a ``.env.example`` placeholder (anything starting with
  ``change-me``) or is shorter than :data:`MIN_LENGTH` characters, naming the variable and the fix.
- :func:`write_env_file` writes an env file a shell can ``source``, created with mode 0600 (never wider,
  not even for an instant).
- :func:`check_secrets` is `detoxflow doctor`'s part: loose file modes and placeholder or short secrets.
- ``python -m detoxflow.team.secrets VAR ...`` validates variables of the environment (the compose
  entrypoints run it before starting a server): one line naming the variable and exit 2 when one is weak.

Secrets travel in environment variables and files only, never in a process's argv.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from detoxflow.team.processes import TeamError

MIN_LENGTH = 16
PLACEHOLDER_PREFIX = "change-me"
SECRETS_FILE = "secrets.env"
CLIENT_FILE = "client.env"
# Where `detoxflow doctor` finds the native stack's files (client.env exports it).
SECRETS_PATH_ENV = "DETOXFLOW_TEAM_SECRETS"

# The native stack's secrets (what each one unlocks: docs/team.md, "Security").
STACK_SECRETS: tuple[str, ...] = (
    "DETOXFLOW_PG_ADMIN_PASSWORD",      # PostgreSQL superuser of the private cluster: administration only
    "DETOXFLOW_PG_MLFLOW_PASSWORD",     # role owning database mlflow: the MLflow server
    "DETOXFLOW_PG_PREFECT_PASSWORD",    # role owning database prefect: the Prefect server
    "DETOXFLOW_PG_LOCK_PASSWORD",       # role that may connect to mlflow and take advisory locks: the gate
    "DETOXFLOW_PREFECT_PASSWORD",       # Prefect API basic auth: a shell on every worker
    "MLFLOW_AUTH_ADMIN_PASSWORD",       # MLflow admin: creates the users below
    "MLFLOW_FLASK_SERVER_SECRET_KEY",   # MLflow auth app's CSRF key
    "DETOXFLOW_MLFLOW_WORKER_PASSWORD",  # MLflow user detoxflow-worker: writes runs, versions, aliases
    "DETOXFLOW_MLFLOW_READER_PASSWORD",  # MLflow user detoxflow-reader: reads (detoxflow generate)
)

# Variables of an environment that hold a secret by themselves, and ones that are URLs with a password in them.
SECRET_VARS: tuple[str, ...] = (
    *STACK_SECRETS, "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD",
    "POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "LOCK_DB_PASSWORD", "PREFECT_AUTH_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD", "MLFLOW_WORKER_PASSWORD", "MLFLOW_READER_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
    "MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY",
)
URL_VARS: tuple[str, ...] = ("DETOXFLOW_LOCK_DB_URI", "PREFECT_API_DATABASE_CONNECTION_URL", "MLFLOW_BACKEND_STORE_URI")


def generate() -> str:
    """A random secret: 48 hex characters (URL-safe, so it can sit in a connection URL)."""
    return secrets.token_hex(24)


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (``export`` and single or double quotes allowed; ``#`` comments and blanks skipped)."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def write_env_file(path: Path, values: Mapping[str, str], header: str = "") -> None:
    """Write ``export KEY='value'`` lines to `path` with mode 0600 from the first byte (atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            if header:
                f.write("".join(f"# {line}\n" for line in header.splitlines()))
            f.writelines(f"export {k}='{v}'\n" for k, v in values.items())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def weakness(value: str) -> str | None:
    """Why `value` may not be a secret (a placeholder, too short), or None when it may."""
    if value.lower().startswith(PLACEHOLDER_PREFIX):
        return "is the .env.example placeholder"
    if len(value) < MIN_LENGTH:
        return f"is shorter than {MIN_LENGTH} characters"
    return None


def url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def validate(values: Mapping[str, str], names: Iterable[str], where: str) -> None:
    """TeamError naming the first of `names` that is missing, a placeholder or too short, and the fix."""
    for name in names:
        value = values.get(name)
        if value is None or value == "":
            raise TeamError(f"{name} is not set in {where}: set it to a random value (openssl rand -hex 24)")
        if name.endswith("AUTH_STRING"):
            value = value.partition(":")[2]
        elif name in URL_VARS:
            value = url_password(value) or ""
        why = weakness(value)
        if why:
            raise TeamError(f"{name} in {where} {why}: replace it with a random value (openssl rand -hex 24)")


def load_or_create(root: Path, legacy_admin_password: Path | None = None) -> dict[str, str]:
    """The stack's secrets from ``root/secrets.env``; created (mode 0600) with random values when absent.

    A value the file lacks is generated and added; the PostgreSQL admin password of a root created before this
    file existed is taken from `legacy_admin_password`. Refuses a file others may read, or a weak value."""
    path = root / SECRETS_FILE
    values: dict[str, str] = {}
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise TeamError(f"{path} has mode {mode:04o}: others may read the stack's secrets; chmod 600 {path}")
        values = parse_env_file(path)
    missing = [n for n in STACK_SECRETS if not values.get(n)]
    if missing:
        if "DETOXFLOW_PG_ADMIN_PASSWORD" in missing and legacy_admin_password and legacy_admin_password.is_file():
            values["DETOXFLOW_PG_ADMIN_PASSWORD"] = legacy_admin_password.read_text().strip()
        for n in missing:
            values.setdefault(n, generate())
        write_env_file(path, {n: values[n] for n in STACK_SECRETS},
                       "detoxflow team stack secrets (mode 0600). Keep private; docs/team.md, 'Security', says\n"
                       "what each unlocks and how to rotate them.")
    validate(values, STACK_SECRETS, str(path))
    return values


def _mode_problem(path: Path) -> str | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return f"{path} has mode {mode:04o} (group or others may read it)" if mode & 0o077 else None


def check_secrets(env: Mapping[str, str], cwd: Path | None = None) -> list[tuple[bool | None, str, str]]:
    """`detoxflow doctor`: (ok, what, fix) for the secrets in `env`, the stack's files and ``./.env``.

    ok None: nothing to check."""
    out: list[tuple[bool | None, str, str]] = []
    files: list[Path] = []
    if env.get(SECRETS_PATH_ENV):
        secrets_file = Path(env[SECRETS_PATH_ENV])
        files += [secrets_file, secrets_file.with_name(CLIENT_FILE), secrets_file.with_name("mlflow-auth.ini")]
    dotenv = (cwd or Path.cwd()) / ".env"
    if dotenv.is_file():
        files.append(dotenv)
    values = dict(env)
    for f in files:
        problem = _mode_problem(f)
        if problem:
            out.append((False, problem, f"chmod 600 {f}"))
        if f.name.endswith(".env") and f.is_file():
            try:
                values.update({k: v for k, v in parse_env_file(f).items() if k not in values})
            except OSError as e:
                out.append((False, f"{f} unreadable ({e.strerror})", f"check its owner and mode: ls -l {f}"))
    checked = 0
    for name in (*SECRET_VARS, *URL_VARS):
        if name not in values:
            continue
        try:
            validate(values, [name], "the environment or its env file")
            checked += 1
        except TeamError as e:
            out.append((False, str(e).partition(":")[0], "replace it with a random value (openssl rand -hex 24) "
                        "everywhere it is used; docs/team.md, 'Rotating secrets'"))
    if not out:
        out.append((True, f"secrets: {checked} checked, none a placeholder or short; no env file readable by others",
                    "") if checked or files else (None, "secrets: none configured here, not checked", ""))
    return out


def main(argv: list[str]) -> int:
    """Validate the environment variables named in `argv`; exit 2 with one line for a weak one."""
    try:
        validate(os.environ, argv, "the environment")
    except TeamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

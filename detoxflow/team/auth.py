"""Who may talk to the team stack's servers: the credentials of the Prefect API and MLflow's basic-auth app.

Both servers' own mechanisms are used, nothing home-made:

- Prefect: one basic-auth credential (``PREFECT_SERVER_API_AUTH_STRING`` on the server, ``PREFECT_API_AUTH_STRING``
  on every client and worker), CSRF protection on, CORS limited to the UI's own origin (:func:`prefect_server_env`).
  :func:`prefect_headers` is what a plain REST call (the stack's administration, `detoxflow doctor`) sends.
- MLflow: ``mlflow server --app-name basic-auth`` with an ini file (:func:`write_mlflow_auth_config`): every
  request needs a user; ``default_permission = READ``; the admin comes from ``MLFLOW_AUTH_ADMIN_PASSWORD`` and
  creates two users (:func:`ensure_mlflow_users`): ``detoxflow-worker`` (workers and deployers: creates and
  writes experiments, runs, model versions and aliases) and ``detoxflow-reader`` (reads only: `detoxflow generate`).
  MLflow grants "set an alias" and "create a model version" with the same permission (EDIT on the registered
  model), so it cannot limit aliases to the gate alone.

``python -m detoxflow.team.auth`` creates (or re-passwords) those users from the environment
(``MLFLOW_TRACKING_URI``, ``MLFLOW_AUTH_ADMIN_PASSWORD`` and the two ``DETOXFLOW_MLFLOW_*_PASSWORD``): compose's
``mlflow-users`` job, and the native systemd unit after the server is up.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from detoxflow.net import JSON_HEADERS, request
from detoxflow.team.processes import TeamError

PREFECT_USER = "detoxflow"
MLFLOW_ADMIN_USER = "admin"
MLFLOW_WORKER_USER = "detoxflow-worker"
MLFLOW_READER_USER = "detoxflow-reader"
# user -> the secret (detoxflow.team.secrets) holding its password
MLFLOW_USERS: dict[str, str] = {
    MLFLOW_WORKER_USER: "DETOXFLOW_MLFLOW_WORKER_PASSWORD",
    MLFLOW_READER_USER: "DETOXFLOW_MLFLOW_READER_PASSWORD",
}


def basic_auth(user_and_password: str) -> dict[str, str]:
    """The Authorization header for ``user:password``."""
    return {"Authorization": "Basic " + base64.b64encode(user_and_password.encode()).decode()}


def prefect_auth_string(password: str) -> str:
    return f"{PREFECT_USER}:{password}"


def prefect_server_env(auth_string: str, ui_origin: str) -> dict[str, str]:
    """The Prefect server's security settings (Prefect's own names): auth, CSRF, CORS to the UI's origin."""
    return {
        "PREFECT_SERVER_API_AUTH_STRING": auth_string,
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ui_origin,
    }


def prefect_client_env(auth_string: str) -> dict[str, str]:
    """What a Prefect client or worker needs to pass that server's checks."""
    return {"PREFECT_API_AUTH_STRING": auth_string, "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true"}


_CSRF_CLIENT = f"detoxflow-{uuid.uuid4()}"
_csrf_tokens: dict[str, tuple[float, str]] = {}  # api -> (fetched at, token); Prefect's tokens live 1 h
CSRF_REFRESH_S = 600.0


def prefect_headers(api_url: str, method: str = "GET", auth_string: str | None = None) -> dict[str, str]:
    """JSON headers for a REST call to the Prefect API: basic auth (`auth_string`, default
    ``$PREFECT_API_AUTH_STRING``) and, for a POST/PUT/PATCH/DELETE to a server with CSRF protection, the CSRF
    token of this process (fetched once per API)."""
    auth = auth_string if auth_string is not None else os.environ.get("PREFECT_API_AUTH_STRING")
    headers = {**JSON_HEADERS, **(basic_auth(auth) if auth else {})}
    if method.upper() not in {"POST", "PUT", "PATCH", "DELETE"}:
        return headers
    api = api_url.rstrip("/")
    fetched, token = _csrf_tokens.get(api, (0.0, ""))
    if not token or time.monotonic() - fetched > CSRF_REFRESH_S:
        r = request(f"{api}/csrf-token?client={_CSRF_CLIENT}", headers=headers, timeout=15.0)
        # 422: the server has CSRF protection off (then no token is needed)
        body = r.json() if r.status == 200 else None
        token = body["token"] if isinstance(body, dict) and "token" in body else ""
        _csrf_tokens[api] = (time.monotonic(), token)
    if token:
        headers.update({"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": _CSRF_CLIENT})
    return headers


def write_mlflow_auth_config(path: Path, database_uri: str) -> None:
    """MLflow's basic-auth ini (``MLFLOW_AUTH_CONFIG_PATH``), mode 0600: users in `database_uri`, READ by
    default, admin ``admin`` (password from ``MLFLOW_AUTH_ADMIN_PASSWORD``, never written here)."""
    text = (
        "# MLflow basic-auth app of the detoxflow team stack (written by detoxflow serve team)\n"
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {MLFLOW_ADMIN_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # Without a cache every request re-hashes the password (PBKDF2): a run's many calls pay it each time.
        # A changed password or deleted user is seen at once by this (single) server worker.
        "auth_cache_ttl_seconds = 60\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_mlflow_users(url: str, admin_password: str, passwords: Mapping[str, str]) -> None:
    """Create each user of `passwords` (user -> password), or set its password when it exists (rotation)."""
    admin = {**JSON_HEADERS, **basic_auth(f"{MLFLOW_ADMIN_USER}:{admin_password}")}
    base = url.rstrip("/") + "/api/2.0/mlflow/users"
    for user, password in passwords.items():
        body = {"username": user, "password": password}
        r = request(f"{base}/create", "POST", body, admin, timeout=15.0)
        if r.status == 200:
            continue
        if r.status == 400 and "RESOURCE_ALREADY_EXISTS" in r.text:
            r = request(f"{base}/update-password", "PATCH", body, admin, timeout=15.0)
            if r.status == 200:
                continue
        if r.status == 401:
            raise TeamError(f"MLflow at {url} refused the admin password: it was created with another "
                            "MLFLOW_AUTH_ADMIN_PASSWORD; docs/team.md, 'Rotating secrets'")
        raise TeamError(f"MLflow at {url}: creating user {user} answered HTTP {r.status}: {r.text[:200]}")


def main() -> int:
    """Wait for MLflow's /health (up to 120 s), then ensure its users; one error line and exit 2 on failure."""
    from detoxflow.team.secrets import validate

    try:
        validate(os.environ, ["MLFLOW_AUTH_ADMIN_PASSWORD", *MLFLOW_USERS.values()], "the environment")
        url = os.environ.get("MLFLOW_TRACKING_URI") or "http://127.0.0.1:5000"
        deadline = time.monotonic() + 120
        while request(f"{url.rstrip('/')}/health").status != 200:
            if time.monotonic() > deadline:
                raise TeamError(f"MLflow at {url} did not answer /health in 120 s: start it or fix MLFLOW_TRACKING_URI")
            time.sleep(1)
        ensure_mlflow_users(url, os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"],
                            {user: os.environ[name] for user, name in MLFLOW_USERS.items()})
    except TeamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MLflow users {', '.join(MLFLOW_USERS)} ready at {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

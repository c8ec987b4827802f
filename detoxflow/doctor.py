"""`detoxflow doctor`: is everything the current mode needs there and answering?

Local mode (no Prefect API and no MLflow server configured) needs a home that can hold state and, once a run
wrote one, a readable MLflow store; team mode needs the servers, database, bucket and work pools. Each check is a small function returning :class:`Check` lines; :func:`run_doctor` prints them as ✔ / ✘ with
what to do, and returns the exit code (0 only when every check passed). Checks use plain HTTP against the
Prefect and MLflow REST APIs so that they test what a worker or a client would actually reach.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from detoxflow.net import JSON_HEADERS, redact_url, request

DEFAULT_POOLS = "cpu,gpu"
# Environment variables that may hold a PostgreSQL URL the team stack depends on.
DATABASE_VARS = ("DETOXFLOW_LOCK_DB_URI", "PREFECT_API_DATABASE_CONNECTION_URL", "MLFLOW_BACKEND_STORE_URI")
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    """One line of the report. `ok` None: informational (not configured, so not checked)."""

    ok: bool | None
    what: str
    fix: str = ""


def _request(url: str, method: str = "GET", body: dict | None = None,
             headers: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """(status, body, error): status 0 with the error text when nothing answered."""
    r = request(url, method, body, {**JSON_HEADERS, **(headers or {})}, timeout=TIMEOUT_S)
    return r.status, r.text, r.reason


# --------------------------------------------------------------------------------------------- Prefect


def _prefect_url(env: Mapping[str, str]) -> str | None:
    url = env.get("PREFECT_API_URL")
    if url:
        return url.rstrip("/")
    if env is not os.environ:
        return None
    try:  # the active Prefect profile, as the prefect CLI itself would use it
        from prefect.settings import get_current_settings

        profile_url = get_current_settings().api.url
    except Exception:  # noqa: BLE001 - an unreadable profile means "not configured" here
        return None
    return profile_url.rstrip("/") if profile_url else None


def check_prefect_api(api: str | None, headers: Mapping[str, str] | None = None) -> list[Check]:
    if not api:
        return [Check(False, "PREFECT_API_URL is not set (Prefect would run an ephemeral local API)",
                      "export PREFECT_API_URL=http://127.0.0.1:4200/api (printed by `detoxflow serve team`)")]
    status, body, err = _request(f"{api}/health")
    if status != 200:
        seen = f"HTTP {status}" if status else err
        return [Check(False, f"Prefect API {api} not healthy ({seen})",
                      "start it (`detoxflow serve team` or `docker compose up -d prefect-server`) or fix PREFECT_API_URL")]
    v_status, version, _ = _request(f"{api}/admin/version", headers=headers)
    server = json.loads(version) if v_status == 200 else "?"
    return [Check(True, f"Prefect API {api} healthy (server {server})")]


def check_pools(api: str, pools: list[str], headers: Mapping[str, str] | None = None) -> list[Check]:
    out = []
    for pool in pools:
        status, body, err = _request(f"{api}/work_pools/{pool}", headers=headers)
        if status == 404:
            out.append(Check(False, f"work pool '{pool}' does not exist",
                             f"`detoxflow deploy` creates it, or `prefect work-pool create {pool} --type process`"))
            continue
        if status != 200:
            out.append(Check(False, f"work pool '{pool}': HTTP {status or err}", "check the Prefect server logs"))
            continue
        if json.loads(body).get("is_paused"):
            out.append(Check(False, f"work pool '{pool}' is paused", f"prefect work-pool resume {pool}"))
            continue
        w_status, w_body, _ = _request(f"{api}/work_pools/{pool}/workers/filter", "POST", {}, headers)
        workers = json.loads(w_body) if w_status == 200 else []
        online = [w["name"] for w in workers if w.get("status") == "ONLINE"]
        if online:
            out.append(Check(True, f"work pool '{pool}': {len(online)} worker(s) online ({', '.join(online[:3])})"))
        else:
            where = "on a CUDA host " if pool == "gpu" else ""
            out.append(Check(False, f"work pool '{pool}' has no worker online",
                             f"start one {where}: `prefect worker start --pool {pool}` "
                             f"(compose: `docker compose up -d worker-{pool}`)"))
    return out


def _deployments_in(prefect_yaml: Path) -> list[str]:
    """'flow/deployment' names declared in prefect.yaml (flow name from `flow_name`, else the entrypoint's function)."""
    import yaml

    doc = yaml.safe_load(prefect_yaml.read_text()) or {}
    names = []
    for d in doc.get("deployments") or []:
        flow = d.get("flow_name") or str(d.get("entrypoint", "")).rsplit(":", 1)[-1].replace("_", "-")
        if d.get("name") and flow:
            names.append(f"{flow}/{d['name']}")
    return names


def check_deployments(api: str, prefect_yaml: Path | None, headers: Mapping[str, str] | None = None) -> list[Check]:
    if prefect_yaml is None or not prefect_yaml.is_file():
        return [Check(None, "deployments: no prefect.yaml here, not checked")]
    wanted = _deployments_in(prefect_yaml)
    status, body, err = _request(f"{api}/deployments/filter", "POST", {"limit": 200}, headers)
    if status != 200:
        return [Check(False, f"deployments: HTTP {status or err}", "check the Prefect server logs")]
    have = set()
    for d in json.loads(body):
        f_status, f_body, _ = _request(f"{api}/flows/{d['flow_id']}", headers=headers)
        if f_status == 200:
            have.add(f"{json.loads(f_body)['name']}/{d['name']}")
    missing = [w for w in wanted if w not in have]
    if missing:
        return [Check(False, f"deployments missing: {', '.join(missing)}",
                      f"`detoxflow deploy` (runs `prefect deploy --all` in {prefect_yaml.parent})")]
    return [Check(True, f"deployments registered: {', '.join(wanted)}")]


# --------------------------------------------------------------------------------------------- MLflow


def _mlflow_headers(env: Mapping[str, str]) -> dict[str, str]:
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"}
    if env.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{env['MLFLOW_TRACKING_USERNAME']}:{env.get('MLFLOW_TRACKING_PASSWORD', '')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


def _http_fix(status: int, service: str) -> str:
    if status == 403:
        return (f"the {service} server refused this Host header: add it to `mlflow server --allowed-hosts` "
                "(the compose file lists mlflow:5000, localhost:5000 and 127.0.0.1:5000)")
    if status == 401:
        return "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
    return "start it (`detoxflow serve team` or `docker compose up -d mlflow`) or fix the URI"


def check_mlflow(env: Mapping[str, str]) -> list[Check]:
    uri = (env.get("MLFLOW_TRACKING_URI") or "").rstrip("/")
    if not uri:
        return [Check(False, "MLFLOW_TRACKING_URI is not set (runs would go to a local SQLite store)",
                      "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (printed by `detoxflow serve team`)")]
    if not uri.startswith(("http://", "https://")):
        return [Check(False, f"MLFLOW_TRACKING_URI={uri} is a local store, not a team tracking server",
                      "point it at the MLflow server, e.g. http://127.0.0.1:5000")]
    headers = _mlflow_headers(env)
    out = []
    status, _, err = _request(f"{uri}/health", headers=headers)
    api_status, _, _ = _request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    if status == 200 and api_status == 200:
        out.append(Check(True, f"MLflow tracking server {uri} reachable"))
    else:
        bad = api_status if status == 200 else status
        out.append(Check(False, f"MLflow tracking server {uri} not usable ({f'HTTP {bad}' if bad else err})",
                         _http_fix(bad, "MLflow")))
        return out

    registry = (env.get("MLFLOW_REGISTRY_URI") or uri).rstrip("/")
    if registry.startswith(("http://", "https://")):
        r_status, _, r_err = _request(f"{registry}/api/2.0/mlflow/registered-models/search?max_results=1",
                                      headers=headers)
        if r_status == 200:
            out.append(Check(True, f"MLflow model registry {registry} reachable"))
        else:
            seen = f"HTTP {r_status}" if r_status else r_err
            fix = (_http_fix(r_status, "MLflow") if r_status in (0, 401, 403)
                   else "the registry needs a database backend: --backend-store-uri postgresql+psycopg2://...")
            out.append(Check(False, f"MLflow model registry {registry}: {seen}", fix))
    else:
        out.append(Check(False, f"MLFLOW_REGISTRY_URI={registry} is not a server",
                         "unset it or point it at the MLflow server"))

    # Proxied artifacts: clients write through the server, so only the server needs bucket credentials.
    a_status, a_body, a_err = _request(f"{uri}/api/2.0/mlflow-artifacts/artifacts", headers=headers)
    if a_status == 200:
        out.append(Check(True, f"MLflow artifact proxy {uri}/api/2.0/mlflow-artifacts answers (store readable)"))
    else:
        seen = f"HTTP {a_status} {a_body[:160]}".rstrip() if a_status else a_err
        out.append(Check(False, f"MLflow artifact proxy: {seen}",
                         "start the server with --serve-artifacts --artifacts-destination <dir or s3://bucket> "
                         "and make sure it can reach that store (S3 endpoint and keys on the server)"))
    return out


# --------------------------------------------------------------------------------------------- PostgreSQL, S3


def check_databases(env: Mapping[str, str]) -> list[Check]:
    urls = {env[v] for v in DATABASE_VARS if env.get(v, "").startswith("postgresql")}
    if not urls:
        return [Check(None, f"database: no PostgreSQL URL in {', '.join(DATABASE_VARS)}, not checked")]
    try:
        import psycopg2
    except ImportError:
        return [Check(False, "database: psycopg2 is not installed, cannot check PostgreSQL",
                      "pip install 'detoxflow[team]'")]
    out = []
    for url in sorted(urls):
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or 5432}{parts.path}"
        try:
            conn = psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=parts.username,
                                    password=parts.password, dbname=parts.path.lstrip("/") or "postgres",
                                    connect_timeout=int(TIMEOUT_S))
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
            finally:
                conn.close()
            out.append(Check(True, f"PostgreSQL {where} reachable"))
        except psycopg2.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            out.append(Check(False, f"PostgreSQL {redact_url(url, mask_empty_password=True)}: {first}",
                             "start it (`docker compose up -d postgres` / `detoxflow serve team`), check user, "
                             "password and that the database exists (infra/postgres/roles.sql creates prefect and mlflow)"))
    return out


def check_bucket(env: Mapping[str, str]) -> list[Check]:
    dest = env.get("MLFLOW_ARTIFACTS_DESTINATION", "")
    if not dest.startswith("s3://"):
        return [Check(None, "S3 bucket: MLFLOW_ARTIFACTS_DESTINATION is not s3://..., not checked")]
    bucket = urlsplit(dest).netloc
    endpoint = env.get("MLFLOW_S3_ENDPOINT_URL")
    try:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return [Check(False, f"S3 bucket {bucket}: boto3 is not installed", "pip install 'detoxflow[team]'")]
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        config=BotoConfig(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        if code in ("404", "NoSuchBucket"):
            fix = f"create it: `docker compose up minio-init` or `mc mb local/{bucket}`"
        else:
            fix = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the MLflow server's bucket key)"
        return [Check(False, f"S3 bucket {bucket} at {endpoint or 'AWS'}: {code}", fix)]
    except BotoCoreError as e:
        return [Check(False, f"S3 endpoint {endpoint or 'AWS'} unreachable: {e}",
                      "start MinIO (`docker compose up -d minio`) or fix MLFLOW_S3_ENDPOINT_URL")]
    return [Check(True, f"S3 bucket {bucket} exists at {endpoint or 'AWS'}")]


# --------------------------------------------------------------------------------------------- report


def current_mode(env: Mapping[str, str]) -> str:
    """"team" when a Prefect API or an MLflow tracking server is configured (a team run uses both), else "local"."""
    if _prefect_url(env) or (env.get("MLFLOW_TRACKING_URI") or "").startswith(("http://", "https://")):
        return "team"
    return "local"


def check_local(env: Mapping[str, str]) -> list[Check]:
    """Local mode: the home can hold state, and its MLflow store (if any run wrote one) is a readable database.
    Prefect needs nothing: each run starts its own API server."""
    import sqlite3

    from detoxflow.locks import sqlite_path
    from detoxflow.paths import find_home

    home = find_home(env=env)
    folder = home.path if home.path.exists() else next(p for p in home.path.parents if p.exists())
    if not os.access(folder, os.W_OK):
        return [Check(False, f"home {home.describe()} is not writable",
                      "pass --home / set DETOXFLOW_HOME to a folder you can write")]
    out = [Check(True, f"home {home.describe()}")]
    state = Path(env["DETOXFLOW_WORK_DIR"]).expanduser() if env.get("DETOXFLOW_WORK_DIR") else home.path
    store = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state.resolve() / 'mlflow.db'}"  # as paths.tracking_uri
    db = sqlite_path(store)
    if db is None or not db.is_file():
        out.append(Check(None, f"MLflow store {store}: nothing run yet (`detoxflow run` creates it)"))
        return out
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=TIMEOUT_S)) as conn:
            n = conn.execute("SELECT count(*) FROM registered_models").fetchone()[0]
    except sqlite3.Error as e:
        return [*out, Check(False, f"MLflow store {db}: {e}", "move the file aside (or pick another --home) and run again")]
    out.append(Check(True, f"MLflow store {store}: {n} registered model(s); `detoxflow ui` opens it"))
    out.append(Check(None, "Prefect: local mode, each run starts its own API server"))
    return out


def collect(env: Mapping[str, str] | None = None, prefect_yaml: Path | None = None,
            mode: str | None = None) -> list[Check]:
    """Every check of ``mode`` (None: :func:`current_mode`) against ``env`` (default: this process's environment)."""
    env = os.environ if env is None else env
    mode = mode or current_mode(env)
    if mode == "local":
        return [Check(None, "mode: local (no Prefect API, no MLflow server configured)"), *check_local(env)]
    pools = [p.strip() for p in env.get("DETOXFLOW_POOLS", DEFAULT_POOLS).split(",") if p.strip()]
    checks: list[Check] = [Check(None, "mode: team")]
    api = _prefect_url(env)
    checks += check_prefect_api(api)
    if api and checks[-1].ok:
        from detoxflow.team.auth import prefect_headers  # basic auth + CSRF token (team stack's security)

        headers = prefect_headers(api, "POST", env.get("PREFECT_API_AUTH_STRING") or "")
        checks[-1:] = check_prefect_api(api, headers)
        checks += check_pools(api, pools, headers)
        if prefect_yaml is None:
            from detoxflow.team import TeamError, find_project_root

            try:
                prefect_yaml = find_project_root() / "prefect.yaml"
            except TeamError:
                prefect_yaml = None
        checks += check_deployments(api, prefect_yaml, headers)
    checks += check_mlflow(env)
    checks += check_databases(env)
    checks += check_bucket(env)
    from detoxflow.team.secrets import check_secrets  # loose modes, placeholder or short secrets

    checks += [Check(*c) for c in check_secrets(env)]
    return checks


def run_doctor(console: Console, env: Mapping[str, str] | None = None, prefect_yaml: Path | None = None,
               mode: str | None = None) -> int:
    """Print each check as ✔ / ✘ (with the fix); 0 when all passed, 1 otherwise."""
    checks = collect(env, prefect_yaml, mode)
    for c in checks:
        if c.ok is None:
            console.print(f"· {c.what}", style="dim", markup=False, highlight=False, soft_wrap=True)
        elif c.ok:
            console.print(f"✔ {c.what}", style="green", markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(f"✘ {c.what}", style="bold red", markup=False, highlight=False, soft_wrap=True)
            console.print(f"    fix: {c.fix}", markup=False, highlight=False, soft_wrap=True)
    failed = sum(1 for c in checks if c.ok is False)
    summary = "all checks passed" if not failed else f"{failed} check(s) failed"
    console.print(summary, markup=False, highlight=False, soft_wrap=True)
    return 1 if failed else 0

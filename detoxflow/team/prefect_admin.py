"""Prefect administration over its REST API and CLI: create the work pools, find the API URL and the project
root (the folder holding prefect.yaml), and register the deployments of prefect.yaml (`detoxflow deploy`).

`deploy_all` works against whatever Prefect API ``PREFECT_API_URL`` names, the native stack's or compose's.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from detoxflow.net import http_get, request
from detoxflow.paths import PROJECT_ROOT
from detoxflow.team.auth import prefect_headers
from detoxflow.team.processes import TeamError, console_script, run_command

log = logging.getLogger("detoxflow.team")  # one logger name for the whole team stack

DEFAULT_POOLS: tuple[str, ...] = ("cpu", "gpu")
PREFECT_API_TIMEOUT_S = 15.0


def prefect_api(api_url: str, method: str, path: str, body: dict | None = None,
                auth_string: str | None = None) -> tuple[int, object]:
    """(status, body) of a Prefect REST call: the decoded JSON on success, the error text on an HTTP error.

    Sends `auth_string` (default ``$PREFECT_API_AUTH_STRING``) and a CSRF token. TeamError when the API does
    not answer."""
    headers = prefect_headers(api_url, method, auth_string)
    r = request(f"{api_url.rstrip('/')}/{path.lstrip('/')}", method, body, headers, timeout=PREFECT_API_TIMEOUT_S)
    if r.status == 0:
        raise TeamError(f"Prefect API {api_url} unreachable ({r.error}): start it (detoxflow serve team, or "
                        "docker compose up -d) and check PREFECT_API_URL") from r.error
    return r.status, (r.json() if r.error is None else r.text)


def ensure_pools(api_url: str, pools: Iterable[str] = DEFAULT_POOLS, pool_type: str = "process",
                 auth_string: str | None = None) -> list[str]:
    """Create each work pool that does not exist yet (process type, Prefect's default job template).

    Returns the names created. Existing pools are left as they are: an operator may have tuned them."""
    from prefect.workers.process import ProcessWorker

    created = []
    for name in pools:
        status, _ = prefect_api(api_url, "GET", f"work_pools/{name}", auth_string=auth_string)
        if status == 200:
            continue
        if status == 401:
            raise TeamError(f"Prefect API {api_url} refused the credentials (HTTP 401): set PREFECT_API_AUTH_STRING "
                            "(the stack's client.env, or PREFECT_AUTH_STRING in compose's .env)")
        if status != 404:
            raise TeamError(f"Prefect API {api_url}: reading work pool '{name}' answered HTTP {status}")
        template = ProcessWorker.get_default_base_job_template() if pool_type == "process" else {}
        status, body = prefect_api(api_url, "POST", "work_pools/",
                                    {"name": name, "type": pool_type, "base_job_template": template}, auth_string)
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
    ensure_pools(api, pools, auth_string=run_env.get("PREFECT_API_AUTH_STRING"))
    log.info("prefect deploy --all from %s against %s", root, api)
    out = run_command([console_script("prefect"), "--no-prompt", "deploy", "--all"], "prefect deploy --all", env=run_env,
               cwd=root, timeout=600)
    names = re.findall(r"Deployment '([^']+)' successfully", re.sub(r"[│\s]+", " ", out))
    log.info("%d deployment(s) registered at %s: %s", len(names), api, ", ".join(names) or "(none reported)")
    return names

"""`detoxflow ui`: open the results. Locally it starts MLflow's own UI (``mlflow ui``) on the current store, bound
to 127.0.0.1, and prints its link; with a tracking server (team mode) it starts nothing and prints the links of
the MLflow and Prefect UIs. Standard library only until the UI process starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from detoxflow.errors import EnvironmentFault, InputError
from detoxflow.locks import sqlite_path
from detoxflow.paths import find_home, tracking_uri, work_dir
from detoxflow.terminal import prefect_ui_url

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class UiPlan:
    """What `detoxflow ui` does: ``command`` to start (None: the UIs run already) and the ``links`` to print."""

    store: str
    command: list[str] | None
    links: list[tuple[str, str]]


def plan(port: int, env: Mapping[str, str] | None = None) -> UiPlan:
    """The UI for the current store: a tracking server's own URL, else ``mlflow ui`` on the local SQLite store
    (which must exist: nothing was run otherwise)."""
    env = os.environ if env is None else env
    store = tracking_uri(create=False)
    prefect = prefect_ui_url(env)
    if store.startswith(("http://", "https://")):
        links = [("MLflow UI", store.rstrip("/"))] + ([("Prefect UI", prefect)] if prefect else [])
        return UiPlan(store, None, links)
    db = sqlite_path(store)
    if db is not None and not db.is_file():
        raise InputError(f"no MLflow store at {db} (home: {find_home().describe()}); run the pipeline first, or "
                         "pass --home / set DETOXFLOW_HOME to the folder that holds mlflow.db")
    artifacts = work_dir(create=False) / "mlartifacts"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", HOST, "--port", str(port),
           "--artifacts-destination", str(artifacts)]
    links = [("MLflow UI", f"http://{HOST}:{port}")] + ([("Prefect UI", prefect)] if prefect else [])
    return UiPlan(store, cmd, links)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - our own http URL
            return bool(resp.status == 200)
    except OSError:
        return False


def serve(p: UiPlan, say: Callable[[str], None]) -> int:
    """Start ``p.command`` (a child that dies with this process), print the links once it answers, wait for it."""
    from detoxflow.children import start_child, stop_child

    assert p.command is not None
    url = p.links[0][1]
    if _answers(url):
        raise EnvironmentFault(f"{url} already answers (another UI?): open it, or pick another --port")
    say(f"starting the MLflow UI on {p.store}")
    log_path = work_dir(create=False) / "mlflow-ui.log"
    with log_path.open("ab") as log:
        proc = start_child(p.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no answer"]
                raise EnvironmentFault(f"the MLflow UI did not start on port {p.command[-3]} ({tail[0]}); "
                                       f"its log: {log_path}")
            time.sleep(0.3)
        for label, link in p.links:
            say(f"{label}: {link}")
        say("Ctrl-C stops it")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_child(proc, grace_s=5)

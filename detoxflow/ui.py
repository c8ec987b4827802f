"""`detoxflow ui`: open the results. Locally it starts MLflow's own UI (``mlflow ui``) on the current store, bound
to 127.0.0.1, and prints its link; with a tracking server (team mode) it starts nothing and prints the links of
the MLflow and Prefect UIs. Standard library only until the UI process starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
    cmd = [sys.executable, "-m", "mlflow", "ui", "--workers", "1", "--backend-store-uri", store, "--host", HOST,
           "--port", str(port), "--artifacts-destination", str(artifacts)]
    links = [("MLflow UI", f"http://{HOST}:{port}")] + ([("Prefect UI", prefect)] if prefect else [])
    return UiPlan(store, cmd, links)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - our own http URL
            return bool(resp.status == 200)
    except OSError:
        return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(p: UiPlan, say: Callable[[str], None]) -> int:
    """Start ``p.command`` (a child that dies with this process), print the links once it answers, wait for it."""
    from detoxflow.children import start_child

    assert p.command is not None
    url = p.links[0][1]
    if _answers(url):
        raise EnvironmentFault(f"{url} already answers (another UI?): open it, or pick another --port")
    say(f"starting the MLflow UI on {p.store}")
    signal.signal(signal.SIGTERM, _interrupt)  # a `kill` stops the UI's processes too, as Ctrl-C does
    signal.signal(signal.SIGINT, _interrupt)  # also where a shell started this in the background (SIGINT ignored)
    log_path = work_dir(create=False) / "mlflow-ui.log"
    # a viewer needs no job runner (MLflow's GenAI jobs start consumer processes of their own); its own session,
    # so that stopping it stops every process it started
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log_path.open("ab") as log:
        proc = start_child(p.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                           start_new_session=True)
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
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 8.0) -> None:
    """SIGTERM to the process group that ``proc`` leads (our child, started in a session of its own), SIGKILL to
    what is left of it after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

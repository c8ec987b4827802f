"""Children die with the command that started them: the Prefect API server of a local run gets a parent-death
signal, so no server outlives a killed ``detoxflow run`` / ``detoxflow train`` (not even after ``kill -9``).

Prefect's own ephemeral server (started when no API URL is configured) is a plain child process that a killed
command leaves behind with parent 1. :func:`prefect_server` starts the same server (``uvicorn`` on
``prefect.server.api.server:create_app``, UI off, ephemeral mode) itself, with ``PR_SET_PDEATHSIG`` set to
SIGTERM in the child, points ``PREFECT_API_URL`` at it, and stops it when the command ends. Nothing is ever
stopped by name: only the process this module started, by its handle. Standard library only; it must run before
Prefect is imported (Prefect reads its settings once, at import).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ServerStartError(RuntimeError):
    """The local Prefect API server did not answer in time; the message says where to look."""


def die_with_parent() -> None:
    """``preexec_fn``: ask the kernel to send this child SIGTERM when its parent dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def prefect_api_configured() -> bool:
    """Is a Prefect API URL set (``$PREFECT_API_URL``, or the active profile's ``PREFECT_API_URL``)?"""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    return bool(data.get("profiles", {}).get(name, {}).get("PREFECT_API_URL"))


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - a local http URL we built
            return bool(resp.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server() -> Iterator[str | None]:
    """A local Prefect API server that dies with this process, as ``PREFECT_API_URL`` for the ``with`` body;
    yields its URL, or None (nothing started) when an API URL is configured already."""
    if prefect_api_configured():
        yield None
        return
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)  # noqa: PLW1509
    try:
        deadline = time.monotonic() + float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 300)
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                what = f"exited with code {proc.returncode}" if proc.poll() is not None else "did not answer"
                raise ServerStartError(
                    f"the local Prefect API server ({' '.join(cmd[:3])} on port {port}) {what}; "
                    "set PREFECT_API_URL to a running server, or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
                )
            time.sleep(0.2)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

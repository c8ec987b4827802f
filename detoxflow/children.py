"""Children die with the command that started them: every process a command starts (the Prefect API server of a
local run, the multi-process training launcher) gets a parent-death signal, so none outlives a killed
``detoxflow run`` / ``detoxflow train`` (not even after ``kill -9``).

:func:`start_child` starts one such child; :func:`run_child` runs one to its end and, when the wait is broken
(SIGINT's ``KeyboardInterrupt``, Prefect's SIGTERM exception), stops it with SIGTERM first, so that a launcher can
stop its own children, and with SIGKILL only after a bounded wait. The launcher's rank processes (grandchildren,
which torchrun starts in sessions of their own and stops with SIGTERM when it gets SIGTERM) call
:func:`die_with_launcher` first thing, so they also die when the launcher itself is killed with -9.

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
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 8.0  # SIGTERM, then SIGKILL: inside the promise that nothing is left 10 s after the command ends


class ServerStartError(RuntimeError):
    """The local Prefect API server did not answer in time; the message says where to look."""


def die_with_parent() -> None:
    """``preexec_fn``: ask the kernel to send this child SIGTERM when its parent dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def start_child(cmd: list[str], **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(cmd, **popen)`` for a child that gets SIGTERM from the kernel when this process dies."""
    return subprocess.Popen(cmd, preexec_fn=die_with_parent, **popen)  # noqa: PLW1509 - prctl only, no locks


def stop_child(proc: subprocess.Popen[Any], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to ``proc`` (this process's own child, by its handle), SIGKILL if it is still there after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_child(cmd: list[str], **popen: Any) -> int:
    """Run ``cmd`` as :func:`start_child` to its end and return its exit code; if the wait is interrupted (an
    exception such as ``KeyboardInterrupt``), stop the child (:func:`stop_child`) before passing it on."""
    proc = start_child(cmd, **popen)
    try:
        return proc.wait()
    except BaseException:
        stop_child(proc)
        raise


def die_with_launcher() -> None:
    """For a process started by a launcher that is not ours (a torchrun rank): SIGTERM when that launcher dies.
    Exits at once if it died already, before the signal was armed."""
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent or parent == 1:
        os._exit(128 + int(signal.SIGTERM))


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
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
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    proc = start_child(cmd, env=env, stdin=subprocess.DEVNULL)
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
        stop_child(proc, grace_s=5)

"""Child processes of the team stack: start a long-running service in its own session with a log file, stop
its whole process group, wait until it is ready, run a command to completion.

Also the small pieces every team module shares: :class:`TeamError` (the error they all raise), free and taken
ports, and where this environment's `mlflow` / `prefect` executables are.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("detoxflow.team")  # one logger name for the whole team stack


class TeamError(RuntimeError):
    """The team stack could not start or act; the message names the service and what to do."""


# --------------------------------------------------------------------------------------------- small helpers


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def console_script(name: str) -> str:
    """The `mlflow` / `prefect` executable of this interpreter's environment, so a venv need not be activated."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise TeamError(f"'{name}' is not installed in this environment: pip install 'detoxflow[team]'")
    return found


def wait_until(check: Callable[[], bool], what: str, timeout: float, proc: ManagedProcess | None = None) -> float:
    """Poll `check` until it holds; returns the seconds it took. Fails fast, with the log tail, if `proc` dies."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        if proc is not None and not proc.alive():
            raise TeamError(f"{what}: the process exited with code {proc.returncode}. Last log lines "
                            f"({proc.log_path}):\n{proc.tail()}")
        time.sleep(0.25)
    tail = f"\nLast log lines ({proc.log_path}):\n{proc.tail()}" if proc is not None else ""
    raise TeamError(f"{what}: not ready after {timeout:.0f} s.{tail}")


# --------------------------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """A long-running child in its own session (so signals reach its children too), logging to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    user: str | None = None  # run as this account (the caller must be root), with its primary group only

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                **({"user": self.user, "group": pwd.getpwnam(self.user).pw_gid, "extra_groups": []} if self.user else {}),
            )
        log.info("%s: started (pid %s), log %s", self.name, self.proc.pid, self.log_path)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGINT, then SIGKILL to the whole process group.

        A Prefect worker that has run flows can ignore SIGTERM (measured), and Prefect's server exits cleanly
        on SIGINT; killing the group also ends flow-run subprocesses a worker started."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGINT, grace / 2), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                log.warning("%s: still running %.0f s after %s", self.name, wait_s, sig.name)
        # Children that outlived their leader (uvicorn workers, flow runs) share the group.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log.info("%s: stopped (exit %s)", self.name, self.proc.returncode)
        self.proc = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def run_command(argv: list[str], what: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 300.0) -> str:
    """Run a command to completion; on failure raise TeamError with its output."""
    try:
        res = subprocess.run(argv, env=dict(env) if env is not None else None, cwd=cwd, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise TeamError(f"{what}: timed out after {timeout:.0f} s ({' '.join(argv)})") from e
    if res.returncode != 0:
        raise TeamError(f"{what} failed (exit {res.returncode}): {' '.join(argv)}\n{res.stdout}{res.stderr}".rstrip())
    return res.stdout

"""Fault injection, a testing aid: kill the process at a named point, deterministically, instead of by timing.

``DETOXFLOW_FAULT=after:<point>`` (or ``after:<point>:<detail>``, e.g. ``after:checkpoint:15``; several
comma-separated) makes the process exit at once with status 137, as ``kill -9`` would, right after that point:
no cleanup, no ``finally``, no flushed buffers. Unset (the normal case) it does nothing. The points are listed in
docs/reliability.md.
"""

from __future__ import annotations

import os

ENV = "DETOXFLOW_FAULT"
KILLED = 137  # 128 + SIGKILL, what a shell reports for a process killed by kill -9


def fault_point(name: str, detail: object | None = None) -> None:
    """Exit with status 137 when ``$DETOXFLOW_FAULT`` names this point (``after:name``, or ``after:name:detail``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted = {f"after:{name}"} if detail is None else {f"after:{name}", f"after:{name}:{detail}"}
    if any(part.strip() in wanted for part in spec.split(",")):
        os._exit(KILLED)

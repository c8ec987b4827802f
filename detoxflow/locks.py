"""The promotion gate's lock: "read champion, decide, set alias" must not interleave between pipelines.

MLflow aliases have no compare-and-set: in a trial of 8 concurrent gates without a lock, the right champion won
only 2 of 5 times. So the gate holds one of two locks:

- a PostgreSQL advisory lock (``pg_advisory_lock``) on a dedicated connection, when the MLflow backend is
  PostgreSQL: every machine that can reach the database is excluded (team mode). The database URI comes from
  ``$DETOXFLOW_LOCK_DB_URI`` (the MLflow server's backend store; clients only know the server's http URL), else
  from the tracking URI itself when that is a ``postgresql://`` URI;
- else a file lock (``filelock``): next to the SQLite database when the tracking URI is SQLite (every process
  that shares the store shares the lock), otherwise under ``<work_dir>/locks`` (one machine only; a warning
  says so when the tracking URI is a remote server).

Both are re-entrant within one thread, so ``register_model`` may take the lock inside a gate that holds it.

:func:`command_lock` is the other lock here: a non-waiting ``flock`` in the work dir that a resumable command
holds for its whole life (one command per fingerprint and work dir); the holder's host, pid and run id are in
the lock file, so the second command can say who holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from detoxflow.net import redact_url
from detoxflow.paths import tracking_uri, work_dir

if TYPE_CHECKING:
    from detoxflow.config import Config

log = logging.getLogger(__name__)

LOCK_DB_ENV = "DETOXFLOW_LOCK_DB_URI"
DEFAULT_TIMEOUT_S = 600.0

# Depth of each lock this thread holds, so nested `with gate_lock(cfg)` does not deadlock on itself.
_held = threading.local()


class LockTimeout(TimeoutError):
    """The gate lock was not acquired in time; the message names the lock and who may hold it."""


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` from a lock name (sha256, first 8 bytes)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def gate_lock_name(cfg: Config) -> str:
    """One lock per registered model: gates of different models never wait on each other."""
    return f"detoxflow.gate:{cfg.registered_model_name}"


def is_postgres_uri(uri: str) -> bool:
    return urlsplit(uri).scheme.split("+", 1)[0] in ("postgresql", "postgres")


def libpq_uri(uri: str) -> str:
    """``postgresql+psycopg2://u@h:p/db`` (SQLAlchemy style, as MLflow wants it) -> ``postgresql://u@h:p/db``."""
    parts = urlsplit(uri)
    if not is_postgres_uri(uri):
        raise ValueError(f"not a PostgreSQL URI: {redact_url(uri)} (expected postgresql://user@host:port/db)")
    return urlunsplit(("postgresql", *parts[1:]))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI, absolute (``sqlite:///rel.db`` is relative to the cwd, as in
    SQLAlchemy; ``sqlite:////abs.db`` absolute), or None for other URIs and in-memory databases."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or parts.path in ("", "/", "/:memory:"):
        return None
    return Path(parts.path[1:]).resolve()


def lock_db_uri(cfg: Config) -> str | None:
    """The PostgreSQL database that hosts the advisory lock, or None when a file lock is used."""
    env = os.environ.get(LOCK_DB_ENV)
    if env:
        if not is_postgres_uri(env):
            raise ValueError(
                f"${LOCK_DB_ENV}={redact_url(env)} is not a PostgreSQL URI. Set it to the MLflow server's backend "
                "store, e.g. postgresql+psycopg2://mlflow:pw@postgres:5432/mlflow, or unset it to use a file lock"
            )
        return env
    uri = tracking_uri(cfg)
    return uri if is_postgres_uri(uri) else None


def lock_file_path(cfg: Config) -> Path:
    """Where the file lock lives: beside a SQLite store (shared by all its users), else in the work dir."""
    uri = tracking_uri(cfg)
    safe = cfg.registered_model_name.replace("/", "_")
    db = sqlite_path(uri)
    if db is not None:
        return db.parent / f"{db.name}.gate-{safe}.lock"
    if urlsplit(uri).scheme in ("http", "https"):
        log.warning(
            "gate lock: tracking URI %s is a server and $%s is unset, so the gate uses a file lock that only "
            "excludes gates on this machine. Set %s to the server's PostgreSQL URI for a team-wide lock.",
            uri, LOCK_DB_ENV, LOCK_DB_ENV,
        )
    return work_dir(cfg.work_dir) / "locks" / f"gate-{safe}.lock"


@contextlib.contextmanager
def _reentrant(name: str) -> Iterator[bool]:
    """Yield True when this thread already holds ``name`` (so the caller must not acquire it again)."""
    depth: dict[str, int] = _held.__dict__.setdefault("depth", {})
    already = depth.get(name, 0) > 0
    depth[name] = depth.get(name, 0) + 1
    try:
        yield already
    finally:
        depth[name] -= 1
        if depth[name] == 0:
            del depth[name]


@contextlib.contextmanager
def pg_advisory_lock(db_uri: str, name: str, timeout: float = DEFAULT_TIMEOUT_S, poll: float = 0.2) -> Iterator[None]:
    """Hold ``pg_advisory_lock(lock_key(name))`` on a dedicated connection for the body of the ``with``.

    Session-level advisory locks belong to the connection, so the lock is released when the body ends, and by
    the server if this process dies (the connection closes). Polls ``pg_try_advisory_lock`` so the wait is
    bounded by ``timeout`` and raises :class:`LockTimeout` instead of hanging forever."""
    with _reentrant(f"pg:{name}") as already:
        if already:
            yield
            return
        try:
            import psycopg2
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                "the PostgreSQL gate lock needs psycopg2: pip install 'detoxflow[team]' (psycopg2-binary)"
            ) from e
        key = lock_key(name)
        conn = psycopg2.connect(libpq_uri(db_uri), connect_timeout=10, application_name="detoxflow-gate-lock")
        try:
            conn.autocommit = True  # an advisory lock must not sit inside a transaction that could roll back
            deadline = time.monotonic() + timeout
            with conn.cursor() as cur:
                while True:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                    if cur.fetchone()[0]:
                        break
                    if time.monotonic() > deadline:
                        raise LockTimeout(
                            f"gate lock '{name}' (pg_advisory_lock key {key} on {redact_url(db_uri)}) not acquired "
                            f"within {timeout:.0f} s: another gate holds it. Find the holder with "
                            f"SELECT pid FROM pg_locks WHERE locktype='advisory'; or raise the timeout"
                        )
                    time.sleep(poll)
            log.debug("gate lock '%s' acquired (pg key %d)", name, key)
            try:
                yield
            finally:
                with contextlib.suppress(Exception), conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            conn.close()


@contextlib.contextmanager
def file_lock(path: Path, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive ``filelock`` on ``path`` (flock: excludes other processes and other threads)."""
    from filelock import FileLock, Timeout

    with _reentrant(f"file:{path}") as already:
        if already:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # thread_local=False: the lock object is used by one thread only, and it must be released by the thread
        # that took it even when the body hands work to other threads.
        lock = FileLock(str(path), thread_local=False)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise LockTimeout(
                f"gate lock '{name}' (file {path}) not acquired within {timeout:.0f} s: another gate holds it. "
                "If no gate is running, a crashed process may still hold it; raise the timeout or check the process"
            ) from None
        try:
            yield
        finally:
            lock.release()


@contextlib.contextmanager
def gate_lock(cfg: Config, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock for the promotion gate of ``cfg.registered_model_name``.

    ``with gate_lock(cfg): champion = get_alias(...); decision = decide(...); set_champion(...)``"""
    name = gate_lock_name(cfg)
    db = lock_db_uri(cfg)
    if db is not None:
        with pg_advisory_lock(db, name, timeout):
            yield
    else:
        with file_lock(lock_file_path(cfg), name, timeout):
            yield


class LockHeld(RuntimeError):
    """Another process holds a command lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: dict[str, object]) -> None:
        self.path = path
        self.holder = holder
        who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "run_id") if k in holder) or "an unknown process"
        super().__init__(f"{path} is held by {who}")


@contextlib.contextmanager
def command_lock(path: Path, holder: dict[str, object]) -> Iterator[dict[str, object]]:
    """Hold an exclusive ``flock`` on ``path`` without waiting, with ``holder`` (host, pid, ...) written into it;
    raise :class:`LockHeld` naming the holder when another process has it. The kernel releases the lock when
    the process dies (even by ``kill -9``). Yields the holder dict: entries added later (the run id) are
    written with :func:`update_holder`."""
    import fcntl
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                found = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                found = {}
            raise LockHeld(path, found) from None
        info = dict(holder)
        _write_holder(fd, info)
        try:
            yield info
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def update_holder(path: Path, info: dict[str, object]) -> None:
    """Rewrite the holder of a lock this process holds (e.g. once the run id is known)."""
    fd = os.open(path, os.O_RDWR)
    try:
        _write_holder(fd, info)
    finally:
        os.close(fd)


def _write_holder(fd: int, info: dict[str, object]) -> None:
    import json

    data = json.dumps(info, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)

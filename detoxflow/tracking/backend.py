"""The tracking backend: where the MLflow store is, how to reach it, and the primitives every other module of
:mod:`detoxflow.tracking` writes with (the client, the run id, run tags, names and limits).

Tracking store: ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite at ``<work_dir>/mlflow.db``
with artifacts under ``<work_dir>/mlartifacts``. A team points every machine at the MLflow server
(``http://mlflow:5000``), which proxies artifacts (``--serve-artifacts``), so a client needs nothing else.

Prefect tasks may run in other threads or processes, where MLflow's (thread-local) active run is not visible:
every function of the package therefore accepts an explicit ``run_id``, else uses this thread's active run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from detoxflow.config import Config
from detoxflow.locks import sqlite_path
from detoxflow.paths import tracking_uri, work_dir

log = logging.getLogger("detoxflow.tracking")  # the name users saw before the split

MODEL_ARTIFACT = "model"  # the run artifact folder of a trained model; a version is registered from it
CHALLENGER = "challenger"
CHAMPION = "champion"

# Run tags (detoxflow.*) and version tags; one name, one meaning, read back by the gate and the report.
TAG_STAGE = "detoxflow.stage"
TAG_CONFIG_DIGEST = "detoxflow.config_digest"
TAG_VERSION = "detoxflow.version"
TAG_GIT_SHA = "detoxflow.git_sha"
TAG_GIT_DIRTY = "detoxflow.git_dirty"
TAG_BASE_MODEL = "detoxflow.base_model"
TAG_REWARD_MODEL = "detoxflow.reward_model"
TAG_CONFIG_NAME = "detoxflow.config_name"
TAG_SPLIT_DIGEST = "detoxflow.split_digest"  # version tag: digest of the held-out split it was evaluated on
METRIC_TAG_PREFIX = "metric."  # version tags "metric.eval/toxicity_mean" = "0.0123" (versions before pyfunc)
# The experiment tag the MLflow UI reads to choose its first page: a "Machine learning" experiment opens on its
# training runs (untagged, MLflow 3's UI may open on the GenAI traces page).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow limits (mlflow.utils.validation): params are strings of at most 6000 characters, 100 params or tags
# and 1000 metrics per log_batch call.
MAX_PARAM_CHARS = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_VERSION_TAG_CHARS = 5000  # far below MLflow's 100 000: tags are for reading in the UI, artifacts for bulk
TRUNCATED = "...[truncated]"


class TrackingError(RuntimeError):
    """A tracking or registry problem a user can fix; the message names the run, model or URI and the fix."""


class TrackingUnreachable(TrackingError):
    """The tracking server stopped answering (after MLflow's bounded retries): the environment, exit 3."""


def unreachable(exc: BaseException) -> TrackingUnreachable | None:
    """A :class:`TrackingUnreachable` for an ``MlflowException`` that MLflow raised because its HTTP request could
    not connect or timed out (a ``requests`` ConnectionError / Timeout in its cause or context), else None: any
    other MlflowException (a missing run, a bad value) is not the server's absence."""
    import requests

    if not isinstance(exc, MlflowException):
        return None
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            found = re.search(r"\[Errno -?\d+\][^'\")]*", str(cur))
            why = found.group(0).strip() if found else type(cur).__name__
            return TrackingUnreachable(
                f"tracking server {mlflow.get_tracking_uri()} stopped answering ({why}). Start it again (or point "
                "tracking.uri / MLFLOW_TRACKING_URI at a running server) and run the same command again to resume"
            )
        cur = cur.__cause__ or cur.__context__
    return None


@contextlib.contextmanager
def server_errors() -> Iterator[None]:
    """Turn MLflow's "cannot reach the tracking server" into :class:`TrackingUnreachable`; other errors go on."""
    try:
        yield
    except MlflowException as e:
        lost = unreachable(e)
        if lost is None:
            raise
        raise lost from e


# ------------------------------------------------------------------------------------------ store and setup


def is_server(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


def artifact_location(cfg: Config, uri: str | None = None) -> str | None:
    """Artifact root for a new experiment, or None to let an MLflow server choose (it proxies artifacts).

    A database URI used directly has no artifact store of its own; MLflow would fall back to ``./mlruns``
    relative to whatever directory the process happens to run in. We pin it: beside a SQLite file, else under
    the work dir."""
    uri = uri or tracking_uri(cfg)
    if is_server(uri):
        return None
    db = sqlite_path(uri)
    if db is not None:
        return (db.parent / "mlartifacts").as_uri()
    return (work_dir(cfg.work_dir) / "mlartifacts").as_uri()


_setup_lock = threading.Lock()


def setup(cfg: Config) -> str:
    """Point MLflow at the config's tracking URI and experiment (created if absent, its kind tagged so the UI
    opens on the runs); returns the experiment id.

    Idempotent and safe when several processes race to create the experiment, or, on a fresh SQLite store, the
    store itself: MLflow creates its tables on first use, and two processes doing that at once fail with "table ...
    already exists", so on SQLite a file lock next to the database serialises that first use."""
    uri = tracking_uri(cfg)
    # MLflow writes "View run ... at: URL" to stdout after every run on a server; stdout is the CLI's JSON
    # output, so the link goes to the log instead (parent_run logs it).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with _setup_lock, _sqlite_init_lock(uri), server_errors():
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        name = cfg.tracking.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name, artifact_location=artifact_location(cfg, uri),
                                                  tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
            except MlflowException:
                # another process created it between our read and our create
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                log.warning("MLflow experiment '%s' was deleted; restoring it", name)
                client.restore_experiment(exp_id)
            if TAG_EXPERIMENT_KIND not in exp.tags:  # an experiment created before the tag: set it once
                client.set_experiment_tag(exp_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """An inter-process lock on ``<db>.init.lock`` for a SQLite tracking URI; nothing for a server."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".init.lock", timeout=300):
        yield


def _client() -> MlflowClient:
    """A client for the current tracking URI, for the modules of this package only (callers use the named
    functions the package exports). Call :func:`setup` first in a fresh process."""
    return MlflowClient(mlflow.get_tracking_uri())


# ------------------------------------------------------------------------------------------ runs and tags


def run_id_or_active(run_id: str | None) -> str:
    """``run_id``, else this thread's active run, else a :class:`TrackingError` that says what to pass."""
    if run_id:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise TrackingError(
            "no MLflow run: pass run_id=... or call this inside `with parent_run(cfg)` / `with child_run(...)` "
            "(the active run is per thread, so a Prefect task in a worker thread must pass the id)"
        )
    return active.info.run_id


def set_tags(tags: Mapping[str, Any], run_id: str | None = None) -> None:
    """Set run tags (values stringified; non-strings as JSON)."""
    rid = run_id_or_active(run_id)
    items = [RunTag(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        _client().log_batch(rid, tags=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)


def artifact_uri(run_id: str, artifact_path: str) -> str:
    """The storage URI of ``artifact_path`` in run ``run_id`` (``mlflow-artifacts:/...``, ``file:///...``)."""
    return f"{_client().get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"

"""Runs: one parent run per flow with the config as params, one child run per stage, and their metrics.

One parent run per pipeline (:func:`parent_run`) with the flattened config as params, the lineage tags of
:func:`detoxflow.tracking.lineage.run_tags` and ``config.yaml``, and one child run per stage
(:func:`child_run`). A retried stage resumes its earlier unfinished child run instead of adding a new one.
Metrics go through :class:`MetricLogger` (one ``log_batch`` per call, non-finite values skipped).

A command resumes its run (:mod:`detoxflow.tasks.resume`) through the functions at the end: runs are tagged
with the command's fingerprint (:data:`TAG_RESUME_KEY`), kept alive by a :class:`Heartbeat` lease (a tag, so it
works across hosts), found by :func:`unfinished_runs` and given up by :func:`mark_abandoned`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from detoxflow.config import Config
from detoxflow.paths import work_dir
from detoxflow.tracking.artifacts import log_config
from detoxflow.tracking.backend import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_VERSION_TAG_CHARS,
    TAG_STAGE,
    TRUNCATED,
    TrackingError,
    _client,
    is_server,
    run_id_or_active,
    server_errors,
    set_tags,
    setup,
    unreachable,
)
from detoxflow.tracking.lineage import run_tags

log = logging.getLogger("detoxflow.tracking")  # the name users saw before the split


# ------------------------------------------------------------------------------------------ params


def _param_value(value: Any) -> str:
    """One param value as MLflow stores it: strings as they are, everything else as JSON; cut at 6000 chars."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_PARAM_CHARS:
        text = text[: MAX_PARAM_CHARS - len(TRUNCATED)] + TRUNCATED
    return text


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params: ``{'ppo.kl.target': '6.0', 'lora.target_modules': 'null', ...}``.

    The full config also goes into the run as ``config.yaml``, so a truncated value is never the only copy."""
    return {k: _param_value(v) for k, v in cfg.flat().items()}


def log_params(params: Mapping[str, str], run_id: str, *, strict: bool = True) -> None:
    """Log the params the run lacks, in batches of MLflow's limit; the ones it has are left as they are.

    ``strict``: a resumed run whose params differ is a different experiment, so a param the run already has
    with another value raises :class:`TrackingError` instead."""
    cli = _client()
    existing = cli.get_run(run_id).data.params
    if strict:
        conflicts = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
        if conflicts:
            shown = "; ".join(f"{k}: run has {a!r}, config has {b!r}" for k, (a, b) in list(conflicts.items())[:5])
            raise TrackingError(
                f"run {run_id} was started with a different config ({shown}). Resume it with the same config, "
                "or start a new run"
            )
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
        cli.log_batch(run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)


# ------------------------------------------------------------------------------------------ runs


@contextlib.contextmanager
def parent_run(
    cfg: Config, run_name: str | None = None, *, run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
    """The pipeline's MLflow run; yields its run id (pass it to tasks as ``parent_run_id``).

    Params = the flattened config, tags = :func:`run_tags`, ``config.yaml`` as an artifact. ``run_id`` resumes
    an existing run (e.g. a retried flow run); its params must match the config. Started inside another
    active run (a KL sweep), it becomes that run's child. The run ends FINISHED, or FAILED on an exception.
    A tracking server that stops answering, at any point of the run (ending it included), raises
    :class:`~detoxflow.tracking.backend.TrackingUnreachable`."""
    with server_errors(), _parent_run(cfg, run_name, run_id=run_id, tags=tags) as rid:
        yield rid


@contextlib.contextmanager
def _parent_run(
    cfg: Config, run_name: str | None, *, run_id: str | None, tags: Mapping[str, str] | None
) -> Iterator[str]:
    exp_id = setup(cfg)
    cli = _client()
    all_tags = {**run_tags(cfg), **(tags or {})}
    nested = mlflow.active_run() is not None
    if run_id is not None:
        try:
            existing = cli.get_run(run_id)
        except MlflowException as e:
            if unreachable(e):
                raise
            raise TrackingError(f"cannot resume run {run_id}: not found at {mlflow.get_tracking_uri()} ({e})") from e
        if existing.info.experiment_id != exp_id:
            raise TrackingError(
                f"cannot resume run {run_id}: it belongs to experiment {existing.info.experiment_id}, the config's "
                f"tracking.experiment '{cfg.tracking.experiment}' is {exp_id}"
            )
        ctx = mlflow.start_run(run_id=run_id, nested=nested, tags=all_tags)
    else:
        ctx = mlflow.start_run(experiment_id=exp_id, run_name=run_name or cfg.name, nested=nested, tags=all_tags)
    with ctx as run:
        rid = run.info.run_id
        log_params(config_params(cfg), rid)
        log_config(cfg, "config.yaml", rid)
        log.info("MLflow run %s (%s): %s", rid, run_name or cfg.name, run_url(rid, exp_id))
        with _failure_tagged(rid):
            yield rid


TAG_FAILURE = "detoxflow.failure"  # on a FAILED run: the error that failed it, one line


@contextlib.contextmanager
def _failure_tagged(run_id: str) -> Iterator[None]:
    """Tag the run with the error that escapes the block (the run then ends FAILED); the error goes on."""
    try:
        yield
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        with contextlib.suppress(Exception):  # a store that cannot take the tag must not mask the error
            set_tags({TAG_FAILURE: reason[:MAX_VERSION_TAG_CHARS]}, run_id=run_id)
        raise


def run_url(run_id: str, experiment_id: str) -> str:
    """The run's page in the MLflow UI when the store is a server, else ``<tracking uri> run <id>``."""
    uri = mlflow.get_tracking_uri()
    if is_server(uri):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} run {run_id}"


def find_child_run(parent_run_id: str, stage: str, *, finished: bool = False) -> str | None:
    """The newest unfinished child of ``parent_run_id`` for ``stage`` (with ``finished``: the newest FINISHED
    one), or None."""
    cli = _client()
    exp_id = cli.get_run(parent_run_id).info.experiment_id
    safe_stage = stage.replace("'", "\\'")
    runs = cli.search_runs(
        [exp_id],
        filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}' and tags.`{TAG_STAGE}` = '{safe_stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=10,
    )
    for r in runs:
        if (r.info.status == RunStatus.to_string(RunStatus.FINISHED)) == finished:
            return r.info.run_id
    return None


def find_run_by_tag(tag: str, value: str, *, experiment_of: str) -> str | None:
    """A run tagged ``tag = value`` in the experiment of run ``experiment_of`` (the newest), or None."""
    cli = _client()
    exp_id = cli.get_run(experiment_of).info.experiment_id
    runs = cli.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def child_run(
    stage: str,
    parent_run_id: str | None = None,
    *,
    cfg: Config | None = None,
    resume: bool = True,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """A nested run for one pipeline stage; yields its run id.

    ``parent_run_id``: the id :func:`parent_run` yielded (needed in a Prefect worker thread or another process;
    defaults to this thread's active run). ``cfg``: call :func:`setup` first (needed in a fresh process unless
    ``$MLFLOW_TRACKING_URI`` is set). ``resume``: a retried stage continues its earlier unfinished child run
    (same parent, same ``stage``) rather than leaving a failed run beside a new one. Stage names must be
    unique within one parent (e.g. ``train``, ``evaluate_baseline``, ``evaluate_aligned``). A tracking server that
    stops answering raises :class:`~detoxflow.tracking.backend.TrackingUnreachable`."""
    with server_errors(), _child_run(stage, parent_run_id, cfg=cfg, resume=resume, tags=tags) as run_id:
        yield run_id


@contextlib.contextmanager
def _child_run(
    stage: str,
    parent_run_id: str | None,
    *,
    cfg: Config | None,
    resume: bool,
    tags: Mapping[str, str] | None,
) -> Iterator[str]:
    if cfg is not None:
        setup(cfg)
    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active else None)
    if parent is None:
        raise TrackingError(
            f"child_run('{stage}'): no parent run. Pass parent_run_id= (the id `with parent_run(cfg) as run_id` "
            "yields) or call it inside the parent run"
        )
    if active is not None and active.info.run_id != parent:
        raise TrackingError(
            f"child_run('{stage}'): this thread's active run {active.info.run_id} is not the parent {parent}; "
            "end it first (stages do not nest inside other stages)"
        )
    cli = _client()
    try:
        parent_info = cli.get_run(parent).info
    except MlflowException as e:
        if unreachable(e):
            raise
        raise TrackingError(
            f"child_run('{stage}'): parent run {parent} not found at {mlflow.get_tracking_uri()}. Is this process "
            "pointed at the same tracking URI as the flow (pass cfg= or set MLFLOW_TRACKING_URI)?"
        ) from e
    all_tags = {TAG_STAGE: stage, **(tags or {})}
    existing = find_child_run(parent, stage) if resume else None
    nested = active is not None
    if existing is not None:
        log.info("resuming MLflow child run %s for stage '%s'", existing, stage)
        ctx = mlflow.start_run(run_id=existing, nested=nested, tags=all_tags)
    else:
        # experiment_id must be the parent's: a nested start_run otherwise lands in the process's current
        # (possibly default) experiment and the child never shows up under its parent.
        ctx = mlflow.start_run(
            experiment_id=parent_info.experiment_id, run_name=stage, parent_run_id=parent, nested=True, tags=all_tags
        )
    with ctx as run, _failure_tagged(run.info.run_id):
        yield run.info.run_id


# ------------------------------------------------------------------------------------------ metrics


class MetricLogger:
    """The trainer's ``log(metrics, step)`` callable: one ``log_batch`` per call, non-finite values skipped.

    Works from any thread or process given the run id (and the tracking URI set by :func:`setup` or env)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = _client()
        self.skipped: dict[str, int] = {}  # key -> number of non-finite values dropped

    def __call__(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        batch: list[Metric] = []
        bad: list[str] = []
        for name, value in metrics.items():
            try:
                x = float(value)
            except (TypeError, ValueError):
                bad.append(f"{name}={value!r} (not a number)")
                continue
            if not math.isfinite(x):
                bad.append(f"{name}={x}")
                continue
            batch.append(Metric(name, x, ts, int(step)))
        if bad:
            new = [b for b in bad if b.split("=", 1)[0] not in self.skipped]
            for b in bad:
                k = b.split("=", 1)[0]
                self.skipped[k] = self.skipped.get(k, 0) + 1
            # warn once per key: a metric that is NaN every step would otherwise flood the log
            (log.warning if new else log.debug)(
                "step %d: skipped metrics that MLflow cannot store: %s", step, ", ".join(bad)
            )
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH], synchronous=True)


def metric_logger(run_id: str | None = None) -> MetricLogger:
    """``log = metric_logger(run_id); log({'objective/kl': 0.3}, step=1)`` — see :class:`MetricLogger`."""
    return MetricLogger(run_id_or_active(run_id))


def log_metrics(metrics: Mapping[str, Any], step: int = 0, run_id: str | None = None) -> None:
    """Log final metrics (``eval/*``) the same way the trainer's curve metrics are logged."""
    MetricLogger(run_id_or_active(run_id))(metrics, step)


# ------------------------------------------------------------------------------------------ resume and leases

TAG_RESUME_KEY = "detoxflow.resume_key"  # the command and its fingerprint (config digest + data digests)
TAG_LEASE_UNTIL = "detoxflow.lease_until"  # epoch seconds: the run is alive until then unless it beats again
TAG_LEASE_HOLDER = "detoxflow.lease_holder"  # JSON {host, pid, work_dir} of the process that last beat
TAG_ABANDONED = "detoxflow.abandoned"  # why an unfinished run was given up (it is then never resumed)
LEASE_ENV = "DETOXFLOW_LEASE_S"
DEFAULT_LEASE_S = 300.0


class ResumeError(TrackingError):
    """A run cannot be resumed (it is alive elsewhere, unknown, or another command holds it); the message says
    who holds it and what to do."""


def lease_seconds() -> float:
    """How long a heartbeat keeps a run alive: ``$DETOXFLOW_LEASE_S``, else 300 s."""
    return float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)


def lease_holder(cfg: Config) -> dict[str, Any]:
    """This process as a lease holder: host, pid and the work dir (whose lock it holds)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "work_dir": str(work_dir(cfg.work_dir).resolve())}


class Heartbeat:
    """Renews the lease of run ``run_id``: ``beat()`` writes ``lease_until = now + lease`` at most every quarter
    lease (``force=True``: now). A run whose lease ran out while it is still RUNNING was abandoned (killed,
    its machine lost) and may be resumed, wherever it ran."""

    def __init__(self, run_id: str, cfg: Config) -> None:
        self.run_id = run_id
        self.lease_s = lease_seconds()
        self.holder = json.dumps(lease_holder(cfg), sort_keys=True)
        self._last = -math.inf

    def beat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.lease_s / 4:
            return
        self._last = now
        _client().set_tag(self.run_id, TAG_LEASE_UNTIL, f"{now + self.lease_s:.3f}")
        _client().set_tag(self.run_id, TAG_LEASE_HOLDER, self.holder)


@dataclass(frozen=True)
class UnfinishedRun:
    """A run of some fingerprint that did not finish: its status, lease and holder."""

    run_id: str
    status: str
    lease_until: float
    holder: dict[str, Any]

    def alive(self, me: Mapping[str, Any], now: float | None = None) -> bool:
        """RUNNING with a lease that has not run out, unless its holder is ``me``'s host and work dir: the
        caller holds that work dir's lock for this fingerprint, so the holder is gone."""
        if self.status != RunStatus.to_string(RunStatus.RUNNING):
            return False
        if self.holder.get("host") == me.get("host") and self.holder.get("work_dir") == me.get("work_dir"):
            return False
        return self.lease_until > (time.time() if now is None else now)


def unfinished_runs(cfg: Config, resume_key: str) -> list[UnfinishedRun]:
    """The runs tagged ``resume_key`` that did not finish and were not abandoned, newest first."""
    exp_id = setup(cfg)
    runs = _client().search_runs(
        [exp_id], filter_string=f"tags.`{TAG_RESUME_KEY}` = '{resume_key}'", order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    found = []
    for r in runs:
        if r.info.status == RunStatus.to_string(RunStatus.FINISHED) or TAG_ABANDONED in r.data.tags:
            continue
        try:
            holder = json.loads(r.data.tags.get(TAG_LEASE_HOLDER, "{}"))
        except ValueError:
            holder = {}
        found.append(UnfinishedRun(r.info.run_id, r.info.status, float(r.data.tags.get(TAG_LEASE_UNTIL, 0) or 0),
                                   holder))
    return found


def mark_abandoned(run_id: str, reason: str) -> None:
    """End an unfinished run FAILED with ``reason`` as its :data:`TAG_ABANDONED` tag; it is never resumed."""
    cli = _client()
    cli.set_tag(run_id, TAG_ABANDONED, reason)
    cli.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def last_logged_step(run_id: str, key: str) -> int:
    """The highest step at which run ``run_id`` logged metric ``key`` (0 when none): a resumed run logs only
    the steps after it, so every step of the metric history is logged once."""
    return max((m.step for m in _client().get_metric_history(run_id, key)), default=0)

"""A flow's MLflow record: its parent run (:func:`flow_run_record`) and one pipeline stage (:class:`Stage`):
an MLflow child run, a wall-clock timing, and the task's Prefect state (cached or not).

Flows do not call :mod:`detoxflow.tracking`: they open ``with flow_run_record(cfg, name) as rec:``, wrap each
task call in ``with Stage(...) as st: value = st.call(task, ...)`` and hand their outcome to ``rec`` and ``st``.
The task is called with ``return_state=True`` so the flow sees whether Prefect served it from the cache (state
name ``Cached``); a failed task raises its exception here, which fails the flow run (nothing after it runs,
nothing registers).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prefect import Task
from prefect.logging import get_run_logger

from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.tasks.reporting import artifact_key, outcome_metrics

logger = logging.getLogger(__name__)

TAG_FLOW_RUN = "detoxflow.prefect_flow_run_id"  # on a flow's MLflow run: the Prefect flow run it belongs to


def prefect_flow_run_id() -> str:
    """The id of the Prefect flow run this code runs in, or "" outside one."""
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def mlflow_info(cfg: Config, run_id: str, experiment_id: str | None = None, **extra: str) -> dict[str, str]:
    """Where a flow's MLflow run lives, for the flow's result (the CLI links to it): ``tracking_uri``,
    ``experiment_id`` (the config's experiment unless given) and ``parent_run_id`` (the run), plus ``extra``."""
    exp = experiment_id if experiment_id is not None else tracking.setup(cfg)
    return {"tracking_uri": tracking.tracking_uri(cfg), "experiment_id": exp, "parent_run_id": run_id, **extra}


@dataclass(frozen=True)
class FlowRunRecord:
    """The flow's MLflow parent run as the flow sees it: its ids, and where its outcome goes."""

    cfg: Config
    run_id: str
    experiment_id: str

    def mlflow_info(self, **extra: str) -> dict[str, str]:
        """Where the run lives, for the flow's result: tracking URI, experiment and parent run ids (+ ``extra``)."""
        return mlflow_info(self.cfg, self.run_id, self.experiment_id, **extra)

    def record_outcome(self, result: Mapping[str, Any], artifact_file: str, timings: Mapping[str, float]) -> None:
        """The flow's result as the JSON artifact ``artifact_file``, the stage timings as ``time/<stage>_s`` and
        its headline numbers as metrics (:func:`~detoxflow.tasks.reporting.outcome_metrics`)."""
        tracking.log_json(result, artifact_file, run_id=self.run_id)
        tracking.log_metrics({f"time/{artifact_key(k)}_s": v for k, v in timings.items()}, run_id=self.run_id)
        tracking.log_metrics(outcome_metrics(result), run_id=self.run_id)  # sortable runs: toxicity, ROUGE-L


@contextlib.contextmanager
def flow_run_record(
    cfg: Config,
    run_name: str,
    *,
    stage: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
    resume_key: str | None = None,
) -> Iterator[FlowRunRecord]:
    """The flow's MLflow parent run (config params, lineage tags, this Prefect flow run's id, ``tags``), as a
    :class:`FlowRunRecord`. ``stage``: the flow's stage tag when the run is a flow of its own (evaluate,
    promote). ``resume_run_id``: continue that unfinished run; ``resume_key``: the command's fingerprint, tagged
    on the run, whose heartbeat lease starts here (:mod:`detoxflow.tasks.resume`). The run ends FINISHED, or
    FAILED when the flow raises."""
    experiment_id = tracking.setup(cfg)
    all_tags = {**({tracking.TAG_STAGE: stage} if stage else {}), **(tags or {}), TAG_FLOW_RUN: prefect_flow_run_id(),
                **({tracking.TAG_RESUME_KEY: resume_key} if resume_key else {})}
    with tracking.parent_run(cfg, run_name=run_name, run_id=resume_run_id, tags=all_tags) as run_id:
        if resume_key:
            tracking.Heartbeat(run_id, cfg).beat(force=True)
        yield FlowRunRecord(cfg, run_id, experiment_id)


class Stage:
    """Context manager around one stage; records ``timings[name]`` and ``cached[name]`` on exit.

    ``parent_run_id``: the pipeline's MLflow run; with ``open_run=True`` a child run tagged with the stage
    name is opened and its id is ``self.run_id`` (pass it to the task). A stage that runs elsewhere (team-mode
    training opens its own child run on the gpu worker) uses ``open_run=False``. In a resumed (or retried) flow
    run a stage that finished before keeps its FINISHED child run: ``self.run_id`` is that run, left as it was
    (its task is served from Prefect's cache), so the parent has one child run per stage."""

    def __init__(
        self,
        name: str,
        cfg: Config,
        parent_run_id: str | None,
        timings: dict[str, float],
        cached: dict[str, bool],
        *,
        open_run: bool = True,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.timings = timings
        self.cached = cached
        self.open_run = open_run and parent_run_id is not None
        self.run_id: str | None = None
        self.was_cached = False
        self.reused = False  # the stage's FINISHED child run from before a resume
        self._stack = contextlib.ExitStack()
        self._t0 = 0.0

    def __enter__(self) -> Stage:
        self._t0 = time.perf_counter()
        if self.parent_run_id is not None:  # each stage renews the flow run's heartbeat lease
            tracking.Heartbeat(self.parent_run_id, self.cfg).beat(force=True)
        if self.open_run:
            assert self.parent_run_id is not None
            done = tracking.find_child_run(self.parent_run_id, self.name, finished=True)
            if done is not None:
                self.run_id, self.reused = done, True
                get_run_logger().info("stage %s: finished before, in MLflow run %s; keeping it", self.name, done)
            else:
                self.run_id = self._stack.enter_context(
                    tracking.child_run(self.name, self.parent_run_id, cfg=self.cfg)
                )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        seconds = time.perf_counter() - self._t0
        self.timings[self.name] = round(seconds, 2)
        self.cached[self.name] = self.was_cached
        try:
            if self.run_id is not None and exc is None and not self.reused:
                tracking.log_metrics({"stage/seconds": seconds}, run_id=self.run_id)
                tracking.set_tags({"detoxflow.cached": str(self.was_cached).lower()}, run_id=self.run_id)
        finally:
            # closes the child run: FINISHED, or FAILED when the stage raised
            self._stack.__exit__(exc_type, exc, tb)
        status = "failed" if exc is not None else ("cache hit" if self.was_cached else "done")
        get_run_logger().info("stage %s: %s in %.1f s", self.name, status, seconds)

    def tag_outcome(self, gate: Mapping[str, Any], version: str, extra: Mapping[str, str] | None = None) -> None:
        """Tag the stage's run with the gate's decision, the version it gated and ``extra`` tags."""
        tags = {"promotion.decision": gate["decision"], "detoxflow.model_version": version, **(extra or {})}
        tracking.set_tags(tags, run_id=self.run_id)

    def call(
        self,
        task: Task[..., Any],
        *args: Any,
        still_valid: Callable[[Any], bool] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``task`` and return its result; note (and log) a cache hit.

        ``still_valid(result)``: for cached tasks whose result points at files; when it returns False for a
        cached result (the files were deleted), the task is run again with ``refresh_cache=True``."""
        log = get_run_logger()
        state = task(*args, return_state=True, **kwargs)
        result = state.result()  # raises the task's exception when it failed
        if state.name == "Cached":
            if still_valid is not None and not still_valid(result):
                log.warning("%s: cached result points at missing files; recomputing", task.name)
                state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
                return state.result()
            self.was_cached = True
            log.info("%s: cache hit, skipped (same config sections, data digest and task source)", task.name)
        return result

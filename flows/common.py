"""Stages every flow starts with: prepare the data and score the baseline (both cached)."""

from __future__ import annotations

from typing import Any

from detoxflow.config import Config
from detoxflow.tasks.caching import BASELINE_POLICY, PREPARE_POLICY, with_cache
from detoxflow.tasks.data import log_lineage, prepare_data, prepared_files_exist
from detoxflow.tasks.evaluation import (
    baseline_files_exist,
    log_evaluation,
    score_baseline,
)
from detoxflow.tasks.stages import Stage


def prepare_and_baseline(
    cfg: Config, parent_run_id: str, timings: dict[str, float], cached: dict[str, bool]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``prepare`` and ``baseline`` stages under ``parent_run_id``; returns (data, baseline) small dicts.

    MLflow logging happens here, outside the cached tasks, so a cache hit still records the data lineage
    and the baseline metrics in this run."""
    with Stage("prepare", cfg, parent_run_id, timings, cached) as st:
        data = st.call(with_cache(prepare_data, cfg, PREPARE_POLICY), cfg, still_valid=prepared_files_exist)
        log_lineage(data, st.run_id)
    with Stage("baseline", cfg, parent_run_id, timings, cached) as st:
        scorer_task = with_cache(score_baseline, cfg, BASELINE_POLICY)
        baseline = st.call(scorer_task, cfg, data, still_valid=baseline_files_exist)
        log_evaluation(baseline, st.run_id, "eval")  # type: ignore[arg-type]
    return data, baseline

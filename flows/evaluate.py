"""The ``evaluate`` flow: evaluate one model URI on the held-out split against the (cached) baseline."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from detoxflow.config import Config
from detoxflow.flows.common import prepare_and_baseline
from detoxflow.tasks.config_source import ConfigFile, record_config, resolve_config
from detoxflow.tasks.evaluation import evaluate_aligned
from detoxflow.tasks.reporting import toxicity_outcome
from detoxflow.tasks.stages import Stage, flow_run_record


@flow(name="evaluate", description="Evaluate a model (models:/, runs:/ or a directory) against the baseline.")
def evaluate_flow(cfg: Config | ConfigFile, model_uri: str) -> dict[str, Any]:
    """Prepare data and baseline (cached), evaluate ``model_uri`` with the same prompts and settings.

    ``cfg``: a Config, or a :class:`~detoxflow.tasks.config_source.ConfigFile` read now (the deployments).
    Returns the model's metrics and the baseline's, the before/after comparison, the alarms, the stage timings
    and where the flow's MLflow run lives (``mlflow``)."""
    t0 = time.perf_counter()
    cfg, source = resolve_config(cfg)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    tags = {"detoxflow.model_uri": model_uri}
    with flow_run_record(cfg, f"{cfg.name}-evaluate", stage="evaluate", tags=tags) as rec:
        parent_id = rec.run_id
        record_config(cfg, source, parent_id)
        data, baseline = prepare_and_baseline(cfg, parent_id, timings, cached)
        with Stage("evaluate", cfg, parent_id, timings, cached) as st:
            evaluation = st.call(evaluate_aligned, cfg, data, model_uri, baseline, run_id=st.run_id)
    timings["total"] = round(time.perf_counter() - t0, 2)
    return {
        "model_uri": model_uri,
        **toxicity_outcome(evaluation, baseline["metrics"]),
        "metrics": evaluation["metrics"],
        "baseline_metrics": baseline["metrics"],
        "n_eval": data["n_eval"],
        "eval_digest": data["eval_digest"],
        "mlflow_run_id": parent_id,
        "mlflow": rec.mlflow_info(),
        "timings": timings,
        "cached": cached,
    }

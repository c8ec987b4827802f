"""The ``evaluate`` flow: evaluate one model URI on the held-out split against the (cached) baseline."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.flows.common import prepare_and_baseline
from detoxflow.tasks.evaluation import evaluate_aligned
from detoxflow.tasks.stages import Stage
from detoxflow.tasks.training import TAG_FLOW_RUN


@flow(name="evaluate", description="Evaluate a model (models:/, runs:/ or a directory) against the baseline.")
def evaluate_flow(cfg: Config, model_uri: str) -> dict[str, Any]:
    """Prepare data and baseline (cached), evaluate ``model_uri`` with the same prompts and settings.

    Returns the model's metrics, the before/after comparison, the alarms and the stage timings."""
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    tracking.setup(cfg)
    tags = {tracking.TAG_STAGE: "evaluate", "detoxflow.model_uri": model_uri, TAG_FLOW_RUN: str(flow_run.id or "")}
    with tracking.parent_run(cfg, run_name=f"{cfg.name}-evaluate", tags=tags) as parent_id:
        data, baseline = prepare_and_baseline(cfg, parent_id, timings, cached)
        with Stage("evaluate", cfg, parent_id, timings, cached) as st:
            evaluation = st.call(evaluate_aligned, cfg, data, model_uri, baseline, run_id=st.run_id)
    timings["total"] = round(time.perf_counter() - t0, 2)
    comp = evaluation["comparison"]
    return {
        "model_uri": model_uri,
        "toxicity_before": baseline["metrics"].get("eval/toxicity_mean"),
        "toxicity_after": evaluation["metrics"].get("eval/toxicity_mean"),
        "relative_change": comp.get("eval/toxicity_rel_change"),
        "relative_change_ci": [
            comp.get("eval/toxicity_rel_change_ci_low"), comp.get("eval/toxicity_rel_change_ci_high")
        ],
        "alarms": evaluation["alarms"],
        "metrics": evaluation["metrics"],
        "eval_digest": data["eval_digest"],
        "mlflow_run_id": parent_id,
        "timings": timings,
        "cached": cached,
    }

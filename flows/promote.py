"""The ``promote`` flow: evaluate a registered version and run the promotion gate on it."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.flows.common import prepare_and_baseline
from detoxflow.tasks.evaluation import evaluate_aligned
from detoxflow.tasks.registry import gate_and_promote
from detoxflow.tasks.stages import Stage
from detoxflow.tasks.training import TAG_FLOW_RUN


@flow(name="promote", description="Evaluate a registered version (models:/NAME/VERSION or @alias) and gate it.")
def promote_flow(cfg: Config, model_uri: str) -> dict[str, Any]:
    """Gate the version ``model_uri`` names against the champion, on the config's held-out split.

    The version's KL (``train/*``) comes from its registration tags; toxicity and quality are measured now,
    with the config's prompts and settings, so the comparison is like for like."""
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    tracking.setup(cfg)
    name, version, _ = tracking.resolve_model_uri(model_uri)
    if name != cfg.registered_model_name:
        raise ValueError(
            f"promote: {model_uri} is a version of '{name}' but the config gates '{cfg.registered_model_name}'. "
            f"Pass --set tracking.registered_model={name} (or the matching config name)"
        )
    info = tracking.get_version(name, version)
    train = {"summary": {k: v for k, v in info.metrics.items() if k.startswith("train/")}}
    tags = {tracking.TAG_STAGE: "promote", "detoxflow.model_uri": info.uri, TAG_FLOW_RUN: str(flow_run.id or "")}
    with tracking.parent_run(cfg, run_name=f"{cfg.name}-promote-v{version}", tags=tags) as parent_id:
        data, baseline = prepare_and_baseline(cfg, parent_id, timings, cached)
        with Stage("evaluate", cfg, parent_id, timings, cached) as st:
            evaluation = st.call(evaluate_aligned, cfg, data, info.uri, baseline, run_id=st.run_id)
        with Stage("gate", cfg, parent_id, timings, cached) as st:
            gate = st.call(gate_and_promote, cfg, version, evaluation, baseline, train, data)
    timings["total"] = round(time.perf_counter() - t0, 2)
    return {
        **gate,
        "model_uri": info.uri,
        "toxicity_before": baseline["metrics"].get("eval/toxicity_mean"),
        "toxicity_after": evaluation["metrics"].get("eval/toxicity_mean"),
        "alarms": evaluation["alarms"],
        "mlflow_run_id": parent_id,
        "timings": timings,
        "cached": cached,
    }

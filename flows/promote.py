"""The ``promote`` flow: evaluate a registered version and run the promotion gate on it."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from detoxflow.config import Config
from detoxflow.flows.common import prepare_and_baseline
from detoxflow.tasks.config_source import ConfigFile, record_config, resolve_config
from detoxflow.tasks.evaluation import evaluate_aligned
from detoxflow.tasks.registry import gate_and_promote, version_aliases, version_to_gate
from detoxflow.tasks.reporting import toxicity_outcome
from detoxflow.tasks.stages import Stage, flow_run_record


@flow(name="promote", description="Evaluate a registered version (models:/NAME/VERSION or @alias) and gate it.")
def promote_flow(cfg: Config | ConfigFile, model_uri: str) -> dict[str, Any]:
    """Gate the version ``model_uri`` names against the champion, on the config's held-out split.

    The version's KL (``train/*``) comes from its registration tags; toxicity and quality are measured now,
    with the config's prompts and settings, so the comparison is like for like. ``cfg``: a Config, or a
    :class:`~detoxflow.tasks.config_source.ConfigFile` read now (the deployments)."""
    t0 = time.perf_counter()
    cfg, source = resolve_config(cfg)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    registered, train = version_to_gate(cfg, model_uri)
    version, uri = registered["version"], registered["uri"]
    tags = {"detoxflow.model_uri": uri}
    with flow_run_record(cfg, f"{cfg.name}-promote-v{version}", stage="promote", tags=tags) as rec:
        parent_id = rec.run_id
        record_config(cfg, source, parent_id)
        data, baseline = prepare_and_baseline(cfg, parent_id, timings, cached)
        with Stage("evaluate", cfg, parent_id, timings, cached) as st:
            evaluation = st.call(evaluate_aligned, cfg, data, uri, baseline, run_id=st.run_id)
        with Stage("gate", cfg, parent_id, timings, cached) as st:
            gate = st.call(gate_and_promote, cfg, version, evaluation, baseline, train, data)
    timings["total"] = round(time.perf_counter() - t0, 2)
    tox = toxicity_outcome(evaluation, baseline["metrics"])
    return {
        **gate,
        "registered_model": registered["name"],
        "aliases": version_aliases(registered["name"], version),
        "model_uri": uri,
        **tox,
        "mlflow_run_id": parent_id,
        "mlflow": rec.mlflow_info(),
        "timings": timings,
        "cached": cached,
    }

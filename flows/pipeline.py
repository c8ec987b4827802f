"""The ``pipeline`` flow: prepare_data -> score_baseline -> train -> evaluate_aligned -> register -> gate.

One MLflow parent run, a child run per stage. Locally every stage runs in this process; with
``orchestration.mode: team`` training runs as the ``train/train-gpu`` deployment on the gpu pool and this
flow waits for it. Any failed stage raises, which fails the flow run before anything is registered.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from detoxflow.config import Config
from detoxflow.flows.common import prepare_and_baseline
from detoxflow.flows.train import train_flow
from detoxflow.tasks.config_source import ConfigFile, record_config, resolve_config
from detoxflow.tasks.evaluation import evaluate_aligned
from detoxflow.tasks.registry import gate_and_promote, register_model
from detoxflow.tasks.reporting import build_summary, publish_summary
from detoxflow.tasks.stages import Stage, flow_run_record
from detoxflow.tasks.training import run_train_deployment


@flow(name="pipeline", description="Detoxify a language model: baseline, PEFT-PPO, evaluation, promotion gate.")
def pipeline(cfg: Config | ConfigFile, resume_run_id: str | None = None, resume_key: str | None = None) -> dict[str, Any]:
    """Run every stage for ``cfg``; returns a summary (toxicity before/after, decision, version, timings).

    ``cfg``: a Config, or a :class:`~detoxflow.tasks.config_source.ConfigFile` read now (the deployments);
    ``resume_run_id``: continue that unfinished pipeline run (its training resumes from its checkpoints);
    ``resume_key``: the command's fingerprint (``detoxflow run`` finds and resumes runs by it)."""
    log = get_run_logger()
    t_start = time.perf_counter()
    cfg, source = resolve_config(cfg)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    with flow_run_record(cfg, cfg.name, resume_run_id=resume_run_id, resume_key=resume_key) as rec:
        parent_id = rec.run_id
        record_config(cfg, source, parent_id)
        data, baseline = prepare_and_baseline(cfg, parent_id, timings, cached)

        team = cfg.orchestration.mode == "team"
        with Stage("train", cfg, parent_id, timings, cached, open_run=False):
            if team:
                train = run_train_deployment(cfg, parent_id, data["train_digest"])
            else:
                train = train_flow(cfg, parent_run_id=parent_id, expected_train_digest=data["train_digest"])

        with Stage("evaluate", cfg, parent_id, timings, cached) as st:
            evaluation = st.call(evaluate_aligned, cfg, data, train["model_uri"], baseline, run_id=st.run_id)

        with Stage("register", cfg, parent_id, timings, cached, open_run=False) as st:
            registered = st.call(register_model, cfg, train["run_id"], evaluation, train)

        with Stage("gate", cfg, parent_id, timings, cached) as st:
            gate = st.call(gate_and_promote, cfg, registered["version"], evaluation, baseline, train, data)
            st.tag_outcome(gate, registered["version"])

        timings["total"] = round(time.perf_counter() - t_start, 2)
        summary = build_summary(
            cfg, data=data, baseline=baseline, train=train, evaluation=evaluation, registered=registered, gate=gate,
            timings=timings, cached=cached, mode="team" if team else "local",
            mlflow_info=rec.mlflow_info(train_run_id=train["run_id"]),
        )
        rec.record_outcome(summary, "summary.json", timings)
    publish_summary(summary, baseline["metrics"], evaluation["metrics"])
    log.info("%s", summary["headline"])
    return summary


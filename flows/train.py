"""The ``train`` flow: PEFT-PPO training alone, so a team can deploy it to the ``gpu`` work pool.

Called three ways: in-process by the pipeline (local mode), by the pipeline through ``run_deployment``
(team mode: it then runs on a gpu worker, possibly another machine, and reports back through MLflow), or
standalone (``detoxflow train``, or the ``train/train-gpu`` deployment with a config).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from detoxflow.config import Config
from detoxflow.tasks.config_source import ConfigFile, record_config, resolve_config
from detoxflow.tasks.stages import mlflow_info
from detoxflow.tasks.training import log_train_result, train_ppo, train_run


@flow(name="train", description="PEFT-PPO training with a KL-penalised reward; logs to MLflow, returns the model URI.")
def train_flow(
    cfg: Config | ConfigFile,
    parent_run_id: str | None = None,
    expected_train_digest: str | None = None,
    resume_run_id: str | None = None,
    resume_key: str | None = None,
) -> dict[str, Any]:
    """Train and log the model to MLflow; returns small values (run id, ``runs:/`` model URI, summary, and
    ``mlflow``: where the training run lives).

    ``parent_run_id``: the pipeline's MLflow run; training then logs to a ``train`` child run of it (resuming
    an unfinished one on retry), and its checkpoints are keyed by the pipeline run. Without it, training gets
    its own top-level run. ``expected_train_digest``: the digest the pipeline's ``prepare_data`` computed;
    a worker whose data differs fails instead of training on other prompts. ``resume_run_id`` / ``resume_key``:
    standalone only, the unfinished run ``detoxflow train`` continues and the fingerprint it tags its run with
    (detoxflow.tasks.resume). ``cfg``: a Config, or a :class:`~detoxflow.tasks.config_source.ConfigFile` read
    now (the deployment)."""
    cfg, source = resolve_config(cfg)
    with train_run(cfg, parent_run_id, resume_run_id=resume_run_id, resume_key=resume_key) as run_id:
        record_config(cfg, source, run_id)
        result = {**train_ppo(cfg, run_id, parent_run_id or run_id, expected_train_digest),
                  "mlflow": mlflow_info(cfg, run_id)}
        # Team mode: the pipeline on another machine reads this back (Prefect results may not be shared).
        log_train_result(result, run_id)
    return result

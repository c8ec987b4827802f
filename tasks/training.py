"""``train_ppo``: PEFT-PPO training as a Prefect task, plus the team-mode call of the ``train`` deployment.

Never cached: a training run is the experiment. ``retries=1`` covers a lost worker or a flaky artifact upload;
the retry resumes from the newest checkpoint in ``<work_dir>/runs/<pipeline run>/train``, so it does not start
over. Deterministic failures (NaN, bad data, bad config) are not retried: they would fail the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State

from detoxflow import tracking
from detoxflow.config import Config, ConfigError
from detoxflow.models import plots, trainer
from detoxflow.models.data import DataError, build_prompt, load_split, split_digest
from detoxflow.models.policy import Policy, PolicyError
from detoxflow.models.reward import RewardError, build_scorer
from detoxflow.paths import work_dir
from detoxflow.tasks.reporting import TrainingProgress

logger = logging.getLogger(__name__)

RESULT_ARTIFACT = "train/result.json"  # the train flow's return value, for a pipeline on another machine
TAG_FLOW_RUN = "detoxflow.prefect_flow_run_id"

# Failures that a retry would reproduce exactly: fail fast instead of training twice.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    trainer.TrainingError, RewardError, DataError, ConfigError, PolicyError, ValueError, TypeError, KeyError,
)


def retry_unless_deterministic(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O and infrastructure failures, not NaNs or bad input."""
    try:
        state.result()
    except DETERMINISTIC_ERRORS:
        return False
    except Exception:  # noqa: BLE001 — anything else (OSError, MLflow/HTTP errors, a killed worker) may pass on retry
        return True
    return True


def train_backend(backend: str) -> Callable[..., trainer.TrainResult]:
    """Our PPO trainer, or TRL's RLOO / GRPO (causal LMs) behind the same signature; TRL is imported only then."""
    if backend == "ppo":
        return trainer.train
    from detoxflow.models.trl_backends import train_trl

    return train_trl


def train_dir(cfg: Config, key: str) -> Path:
    """The trainer's output folder, keyed by the pipeline run: a retry finds the checkpoints of the first try."""
    return work_dir(cfg.work_dir) / "runs" / key / "train"


def train_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """What the gate and the report read from a training run (``train/*``).

    ``train/kl_mean`` is the mean KL to the reference over the last fifth of the steps (at least one): the
    final policy's distance from the reference, smoothed over a few batches rather than one noisy one."""
    if not history:
        return {}
    tail = history[-max(1, math.ceil(len(history) / 5)):]

    def mean(key: str) -> float:
        values = [row[key] for row in tail if key in row]
        return float(sum(values) / len(values)) if values else math.nan

    return {
        "train/steps": float(len(history)),
        "train/kl_mean": mean("objective/kl"),
        "train/scores_mean": mean("objective/scores"),
        "train/toxicity_mean": mean("objective/toxicity"),
        "train/kl_coef": float(history[-1].get("objective/kl_coef", math.nan)),
    }


@task(
    name="train_ppo",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_deterministic,
)
def train_ppo(cfg: Config, run_id: str, work_key: str, expected_train_digest: str | None = None) -> dict[str, Any]:
    """Train on the train split, log curves and the model to MLflow run ``run_id``; return small values only.

    Returns ``{"run_id", "model_uri" (runs:/<run_id>/model), "artifact_dir", "checkpoint_dir", "steps",
    "train_digest", "summary" (train/*), "last" (the last step's metrics)}``."""
    log = get_run_logger()
    tracking.setup(cfg)
    records = load_split(cfg.data, cfg.data.train_split)
    digest = split_digest(records)
    if expected_train_digest is not None and digest != expected_train_digest:
        # In team mode this runs on another machine: it must train on exactly the split the pipeline prepared.
        raise DataError(
            f"data.source={cfg.data.source!r}: split '{cfg.data.train_split}' has digest {digest} here but "
            f"{expected_train_digest} where the pipeline prepared it. Give both machines the same data."
        )
    ids = [r.id for r in records]
    tracking.log_split(cfg.data.train_split, digest, cfg.data.source, ids, "training", run_id=run_id)
    prompts = [build_prompt(cfg.data.prompt_template, r) for r in records]
    # Policy.load draws the LoRA A matrices from the global torch RNG, which earlier stages of this process
    # (the baseline's own Policy.load) may have consumed: unseeded, a cold pipeline (baseline generated in
    # this process) and a warm one (baseline cached) trained from different adapters with the same seed.
    torch.manual_seed(cfg.seed)
    policy = Policy.load(cfg.model, cfg.lora)
    scorer = build_scorer(cfg.reward)
    out_dir = train_dir(cfg, work_key)
    metrics_log = tracking.metric_logger(run_id)
    progress = TrainingProgress(cfg.ppo.steps, cfg.name)

    def log_step(metrics: dict[str, float], step: int) -> None:
        metrics_log(metrics, step)
        progress.update(step)

    result = train_backend(cfg.ppo.backend)(cfg, policy, scorer, prompts, out_dir, log=log_step, resume=True)
    summary = train_summary(result.history)
    tracking.log_metrics(summary, step=result.steps, run_id=run_id)
    tracking.log_json(result.history, "train/history.json", run_id=run_id)
    tracking.log_model_dir(result.artifact_dir, run_id=run_id)
    _log_curves(result.history, out_dir, cfg.ppo.kl.target, run_id)
    log.info("trained %d steps: KL %.3f, score %.3f; model in %s", result.steps, summary.get("train/kl_mean", math.nan),
             summary.get("train/scores_mean", math.nan), result.artifact_dir)
    return {
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/model",
        "artifact_dir": str(result.artifact_dir),
        "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
        "steps": result.steps,
        "train_digest": digest,
        "summary": summary,
        "last": {k: float(v) for k, v in (result.history[-1] if result.history else {}).items()},
    }


def _log_curves(history: list[dict[str, float]], out_dir: Path, kl_target: float, run_id: str) -> None:
    """Reward, KL and length curves over the PPO steps, as a PNG in the run's ``plots/``."""
    png = plots.training_curves(history, out_dir / "training_curves.png", kl_target=kl_target)
    tracking.log_file(png, "plots", run_id=run_id)


def run_train_deployment(cfg: Config, parent_run_id: str, expected_train_digest: str) -> dict[str, Any]:
    """Team mode: run the ``train`` deployment (gpu pool), wait for it, and read its result from MLflow.

    The result travels through MLflow, not Prefect's result storage: the gpu worker may be another machine,
    and MLflow is the store both sides already share."""
    import mlflow
    from prefect.deployments import run_deployment

    log = get_run_logger()
    orch = cfg.orchestration
    log.info("team mode: running deployment %s and waiting for it", orch.train_deployment)
    fr = run_deployment(
        orch.train_deployment,
        parameters={
            "cfg": cfg.model_dump(mode="json"),
            "parent_run_id": parent_run_id,
            "expected_train_digest": expected_train_digest,
        },
        timeout=orch.train_timeout_s,
        poll_interval=orch.poll_seconds,
    )
    state = fr.state
    if state is None or not state.is_completed():
        kind = state.type.value if state is not None else "UNKNOWN"
        if state is not None and not state.is_final():
            raise TimeoutError(
                f"deployment {orch.train_deployment}: flow run '{fr.name}' ({fr.id}) is still {kind} after "
                f"{orch.train_timeout_s} s. Is a worker polling its work pool (prefect worker start --pool gpu)? "
                "Raise orchestration.train_timeout_s for long runs."
            )
        raise RuntimeError(
            f"deployment {orch.train_deployment}: flow run '{fr.name}' ({fr.id}) ended {kind}: "
            f"{state.message if state is not None else 'no state'}. See its logs in the Prefect UI."
        )
    tracking.setup(cfg)
    cli = tracking.client()
    exp_id = cli.get_run(parent_run_id).info.experiment_id
    runs = cli.search_runs(
        [exp_id],
        filter_string=f"tags.`{TAG_FLOW_RUN}` = '{fr.id}'",
        max_results=1,
    )
    if not runs:
        raise RuntimeError(
            f"train flow run {fr.id} completed but no MLflow run is tagged {TAG_FLOW_RUN}={fr.id} at "
            f"{tracking.tracking_uri(cfg)}. Do the gpu worker and this worker use the same MLFLOW_TRACKING_URI?"
        )
    run_id = runs[0].info.run_id
    result = mlflow.artifacts.load_dict(f"runs:/{run_id}/{RESULT_ARTIFACT}")
    log.info("train run %s finished on the %s deployment: %s", run_id, orch.train_deployment, result["model_uri"])
    return dict(result)

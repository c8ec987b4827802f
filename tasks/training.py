"""``train_ppo``: PEFT-PPO training as a Prefect task, plus the team-mode call of the ``train`` deployment.

Never cached: a training run is the experiment. ``retries=1`` covers a lost worker or a flaky artifact upload;
the retry resumes from the newest checkpoint in ``<work_dir>/runs/<pipeline run>/train``, so it does not start
over. Deterministic failures (NaN, bad data, bad config) are not retried: they would fail the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State

from detoxflow import atomic, children, tracking
from detoxflow.config import Config, ConfigError
from detoxflow.models import distributed, plots, trainer
from detoxflow.models.data import DataError, build_prompt, load_split, split_digest
from detoxflow.models.policy import Policy, PolicyError
from detoxflow.models.prompts import check_lengths
from detoxflow.models.reward import RewardError, build_scorer
from detoxflow.paths import PROJECT_ROOT, work_dir
from detoxflow.tasks.reporting import TrainingProgress
from detoxflow.tasks.stages import TAG_FLOW_RUN, prefect_flow_run_id

logger = logging.getLogger(__name__)

RESULT_ARTIFACT = "train/result.json"  # the train flow's return value, for a pipeline on another machine
ACCELERATE_CONFIG_ENV = "DETOXFLOW_ACCELERATE_CONFIG"  # an accelerate config file instead of infra/accelerate/ddp*.yaml

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
    final policy's distance from the reference, smoothed over a few batches rather than one noisy one. It
    averages ``objective/kl``, the configured ``ppo.kl.estimator`` (the figure the reward penalises and the KL
    controller steers). This is the one training summary."""
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

    With ``orchestration.train_processes`` N > 1 the training runs in N processes started by ``accelerate
    launch`` (data-parallel; rank 0 logs to ``run_id``) and this task waits for them.

    Returns ``{"run_id", "model_uri" (runs:/<run_id>/model), "artifact_dir", "checkpoint_dir", "steps",
    "train_digest", "summary" (train/*), "last" (the last step's metrics)}``, plus ``"distributed"``
    (world size, every rank's weights digest before and after) for a multi-process run."""
    log = get_run_logger()
    n = cfg.orchestration.train_processes
    if n > 1:
        result = launch_training(cfg, run_id, work_key, expected_train_digest)
    else:
        progress = TrainingProgress(cfg.ppo.steps, cfg.name)
        result = train_and_log(cfg, run_id, work_key, expected_train_digest, on_step=progress.update)
    summary = result["summary"]
    log.info("trained %d steps%s: KL %.3f, score %.3f; model in %s", result["steps"],
             f" in {n} processes" if n > 1 else "", summary.get("train/kl_mean", math.nan),
             summary.get("train/scores_mean", math.nan), result["artifact_dir"])
    return result


def train_and_log(
    cfg: Config,
    run_id: str,
    work_key: str,
    expected_train_digest: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The body of :func:`train_ppo`, free of Prefect so that every rank of a launch can run it.

    Every rank loads the data and the policy and trains; only rank 0 talks to MLflow (split lineage, metrics,
    curves, the model) and calls ``on_step``. Returns the same dict on every rank."""
    dist = distributed.current()
    main = dist.is_main
    if main:
        tracking.setup(cfg)
    records = load_split(cfg.data, cfg.data.train_split)
    digest = split_digest(records)
    if expected_train_digest is not None and digest != expected_train_digest:
        # In team mode this runs on another machine: it must train on exactly the split the pipeline prepared.
        raise DataError(
            f"data.source={cfg.data.source!r}: split '{cfg.data.train_split}' has digest {digest} here but "
            f"{expected_train_digest} where the pipeline prepared it. Give both machines the same data."
        )
    prompts = [build_prompt(cfg.data.prompt_template, r) for r in records]
    if main:
        tracking.log_split(cfg.data.train_split, digest, cfg.data.source, [r.id for r in records], "training",
                           run_id=run_id)
    # Policy.load draws the LoRA A matrices from the global torch RNG, which earlier stages of this process
    # (the baseline's own Policy.load) may have consumed: unseeded, a cold pipeline (baseline generated in
    # this process) and a warm one (baseline cached) trained from different adapters with the same seed.
    torch.manual_seed(cfg.seed)
    policy = Policy.load(cfg.model, cfg.lora)
    check_lengths(policy.tokenizer, prompts, [r.id for r in records], cfg.data, f"split '{cfg.data.train_split}'")
    scorer = build_scorer(cfg.reward)
    out_dir = train_dir(cfg, work_key)
    log_step: trainer.LogFn = _no_log
    if main:
        metrics_log = tracking.metric_logger(run_id)
        # the heartbeat lease of the command's own run: a work key is that run's id (the pipeline's, or this
        # one), optionally followed by "/<setting>" (the KL sweep keys each setting's checkpoints so)
        heartbeat = tracking.Heartbeat(work_key.split("/", 1)[0], cfg)
        # a resumed run: the killed one may have logged steps after its last checkpoint; those are not logged
        # again, so every step of the metric history is logged once (a resumed step recomputes the same values)
        logged = tracking.last_logged_step(run_id, "objective/scores")

        def log_step(metrics: dict[str, float], step: int) -> None:
            heartbeat.beat()
            if step > logged:
                metrics_log(metrics, step)
            if on_step is not None:
                on_step(step)

    result = train_backend(cfg.ppo.backend)(cfg, policy, scorer, prompts, out_dir, log=log_step, resume=True)
    summary = train_summary(result.history)
    if main:
        tracking.log_metrics(summary, step=result.steps, run_id=run_id)
        tracking.log_json(result.history, "train/history.json", run_id=run_id)
        tracking.log_model_dir(result.artifact_dir, run_id=run_id)
        _log_curves(result.history, out_dir, cfg.ppo.kl.target, run_id)
    out: dict[str, Any] = {
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/model",
        "artifact_dir": str(result.artifact_dir),
        "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
        "steps": result.steps,
        "train_digest": digest,
        "summary": summary,
        "last": {k: float(v) for k, v in (result.history[-1] if result.history else {}).items()},
    }
    info = getattr(result, "distributed", None)  # TRL backends train in one process and have none
    if info is not None:
        out["distributed"] = info
        if main:
            tracking.set_tags({"detoxflow.train_processes": str(info["world_size"])}, run_id=run_id)
    return out


def _no_log(metrics: dict[str, float], step: int) -> None:
    """Ranks other than 0 log nothing: rank 0 logs the metrics averaged over all ranks."""


# ------------------------------------------------------------------------------------- multi-process launch


class LaunchError(RuntimeError):
    """The multi-process training launch failed; the message carries the tail of the ranks' log.

    Not in DETERMINISTIC_ERRORS: a killed process or a lost rank may pass on the retry (which resumes)."""


def _trains_on_cuda(cfg: Config) -> bool:
    return cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available())


def accelerate_config(cfg: Config) -> Path:
    """``$DETOXFLOW_ACCELERATE_CONFIG``, else infra/accelerate/ddp.yaml (NCCL) when training on CUDA, else
    infra/accelerate/ddp-cpu.yaml (gloo)."""
    env = os.environ.get(ACCELERATE_CONFIG_ENV)
    if env:
        path = Path(env)
    else:
        path = PROJECT_ROOT / "infra" / "accelerate" / ("ddp.yaml" if _trains_on_cuda(cfg) else "ddp-cpu.yaml")
    if not path.is_file():
        raise ConfigError(
            f"orchestration.train_processes={cfg.orchestration.train_processes}: accelerate config {path} not found. "
            f"Run from a detoxflow checkout (infra/accelerate/) or set ${ACCELERATE_CONFIG_ENV} to a config file"
        )
    return path


def launch_command(cfg: Config, config_json: Path, run_id: str, work_key: str, result_json: Path,
                   expected_train_digest: str | None) -> list[str]:
    """``accelerate launch --num_processes N -m detoxflow.cli train-rank ...``: N ranks of :func:`run_rank`."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config(cfg)),
        "--num_processes", str(cfg.orchestration.train_processes),
        # a free port, chosen here: several launches may share a machine, and torch 2.6's elastic agent hands a
        # port of 0 to the ranks as it is (they then wait for a store that never listens)
        "--main_process_port", str(children.free_port()),
        "-m", "detoxflow.cli", "train-rank",
        "--config-json", str(config_json), "--run-id", run_id, "--work-key", work_key, "--result", str(result_json),
    ]
    if expected_train_digest is not None:
        cmd += ["--expected-train-digest", expected_train_digest]
    return cmd


def launch_training(cfg: Config, run_id: str, work_key: str, expected_train_digest: str | None) -> dict[str, Any]:
    """Run :func:`train_and_log` in ``orchestration.train_processes`` processes and return rank 0's result.

    The ranks' output goes to ``<train dir>/launch/ranks.log``; the config travels as JSON, so overrides and
    defaults are exactly those of this run."""
    if cfg.ppo.backend != "ppo":
        raise ConfigError(
            f"orchestration.train_processes={cfg.orchestration.train_processes} with ppo.backend={cfg.ppo.backend}: "
            "only the ppo backend trains data-parallel; set orchestration.train_processes=1"
        )
    launch_dir = train_dir(cfg, work_key) / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    config_json = launch_dir / "config.json"
    config_json.write_text(cfg.model_dump_json(indent=2))
    result_json = launch_dir / "result.json"
    result_json.unlink(missing_ok=True)
    ranks_log = launch_dir / "ranks.log"
    cmd = launch_command(cfg, config_json, run_id, work_key, result_json, expected_train_digest)
    logger.info("launching %d training processes; their log: %s", cfg.orchestration.train_processes, ranks_log)
    # OpenMP threads that spin while waiting starve the other ranks on a shared CPU (the CLI sets the same)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with ranks_log.open("ab") as fh:  # the launcher (and through it its ranks) dies with this process
        returncode = children.run_child(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if returncode != 0 or not result_json.is_file():
        tail = ranks_log.read_text(errors="replace")[-4000:]
        raise LaunchError(
            f"multi-process training ({cfg.orchestration.train_processes} processes) exited with code "
            f"{returncode}. Command: {' '.join(cmd)}\n--- last lines of {ranks_log} ---\n{tail}"
        )
    return dict(json.loads(result_json.read_text()))


def run_rank(cfg: Config, run_id: str, work_key: str, result_json: Path, expected_train_digest: str | None) -> None:
    """One rank of :func:`launch_training` (``detoxflow train-rank``): join the group, train, and on rank 0
    write the result for the launching task."""
    dist = distributed.init(cpu=not _trains_on_cuda(cfg))
    try:
        result = train_and_log(cfg, run_id, work_key, expected_train_digest)
        if dist.is_main:
            atomic.write_text(result_json, json.dumps(result, indent=2, default=str))
    finally:
        distributed.shutdown()


def _log_curves(history: list[dict[str, float]], out_dir: Path, kl_target: float, run_id: str) -> None:
    """Reward, KL and length curves over the PPO steps, as a PNG in the run's ``plots/``."""
    png = plots.training_curves(history, out_dir / "training_curves.png", kl_target=kl_target)
    tracking.log_file(png, "plots", run_id=run_id)


@contextlib.contextmanager
def train_run(
    cfg: Config, parent_run_id: str | None = None, *, resume_run_id: str | None = None, resume_key: str | None = None
) -> Iterator[str]:
    """The train flow's MLflow run, tagged with its Prefect flow run; yields the run id.

    With ``parent_run_id`` (the pipeline's run) a ``train`` child run of it, resuming an unfinished one on
    retry; without, a top-level run of its own tagged as the ``train`` stage: ``resume_run_id`` continues that
    run (``detoxflow train`` found it unfinished), ``resume_key`` tags it with the command's fingerprint and
    starts its heartbeat lease (:mod:`detoxflow.tasks.resume`)."""
    tracking.setup(cfg)
    tags = {TAG_FLOW_RUN: prefect_flow_run_id()}
    if parent_run_id:
        ctx = tracking.child_run("train", parent_run_id, cfg=cfg, tags=tags)
    else:
        top = {tracking.TAG_STAGE: "train", **tags, **({tracking.TAG_RESUME_KEY: resume_key} if resume_key else {})}
        ctx = tracking.parent_run(cfg, run_name=f"{cfg.name}-train", run_id=resume_run_id, tags=top)
    with ctx as run_id:
        if not parent_run_id:
            tracking.Heartbeat(run_id, cfg).beat(force=True)
        yield run_id


def log_train_result(result: dict[str, Any], run_id: str) -> None:
    """The train flow's result as ``train/result.json``: a pipeline on another machine reads it back
    (:func:`run_train_deployment`), as Prefect results may not be shared."""
    tracking.log_json(result, RESULT_ARTIFACT, run_id=run_id)


def run_train_deployment(cfg: Config, parent_run_id: str, expected_train_digest: str) -> dict[str, Any]:
    """Team mode: run the ``train`` deployment (gpu pool), wait for it, and read its result from MLflow.

    The result travels through MLflow, not Prefect's result storage: the gpu worker may be another machine,
    and MLflow is the store both sides already share."""
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
    run_id = tracking.find_run_by_tag(TAG_FLOW_RUN, str(fr.id), experiment_of=parent_run_id)
    if run_id is None:
        raise RuntimeError(
            f"train flow run {fr.id} completed but no MLflow run is tagged {TAG_FLOW_RUN}={fr.id} at "
            f"{tracking.tracking_uri(cfg)}. Do the gpu worker and this worker use the same MLFLOW_TRACKING_URI?"
        )
    result = tracking.load_json(run_id, RESULT_ARTIFACT)
    log.info("train run %s finished on the %s deployment: %s", run_id, orch.train_deployment, result["model_uri"])
    return dict(result)

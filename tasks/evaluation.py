"""``score_baseline`` and ``evaluate_aligned``: the same held-out prompts, the same settings, before and after.

Both write the full :class:`~detoxflow.models.evaluate.EvalResult` (metrics + per-prompt samples) to a JSON
file under the work dir and return a small dict: the numeric metrics, the two digests and the file path.
``score_baseline`` is cached (the policy before training does not change when only PPO settings do).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from detoxflow import atomic, tracking
from detoxflow.config import Config
from detoxflow.models import plots
from detoxflow.models.evaluate import EvalResult, compare, evaluate, samples_table
from detoxflow.models.monitors import alarms as monitor_alarms
from detoxflow.models.policy import Policy
from detoxflow.models.reward import build_scorer
from detoxflow.paths import work_dir
from detoxflow.tasks.caching import baseline_key
from detoxflow.tasks.data import read_records
from detoxflow.tasks.reporting import publish_samples

logger = logging.getLogger(__name__)


def save_result(result: EvalResult, path: Path) -> None:
    atomic.write_text(path, json.dumps(result.to_dict(), ensure_ascii=False, default=str))


def load_result(path: str | Path) -> EvalResult:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: evaluation result missing (was the work dir cleaned?); rerun the pipeline")
    return EvalResult.from_dict(json.loads(p.read_text(encoding="utf-8")))


def baseline_files_exist(baseline: dict[str, Any]) -> bool:
    """A cached baseline is only usable while its result file (the per-prompt samples) still exists."""
    return Path(baseline["result_path"]).is_file()


def summarize(result: EvalResult, path: Path) -> dict[str, Any]:
    """The small dict passed between stages: numeric metrics plus the digests the gate checks."""
    return {
        "metrics": result.numeric(),
        "split_digest": result.split_digest,
        "settings_digest": result.settings_digest,
        "result_path": str(path),
    }


def gate_metrics(evaluation: dict[str, Any], train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics in the shape ``promotion.decide`` reads: ``eval/*`` + ``train/*`` + both digests."""
    return {
        **evaluation["metrics"],
        **((train or {}).get("summary") or {}),
        "split_digest": evaluation["split_digest"],
        "settings_digest": evaluation["settings_digest"],
    }


def log_evaluation(evaluation: dict[str, Any], run_id: str, artifact_dir: str) -> None:
    """Metrics, digests and the full result file into an MLflow run (also for a cached baseline)."""
    tracking.log_metrics(evaluation["metrics"], run_id=run_id)
    digests = {"detoxflow.split_digest": evaluation["split_digest"],
               "detoxflow.settings_digest": evaluation["settings_digest"]}
    tracking.set_tags(digests, run_id=run_id)
    tracking.log_file(evaluation["result_path"], artifact_dir, run_id=run_id)


# Uncached as declared: the cache (BASELINE_POLICY) is bound per run by with_cache(), with result storage under
# cfg.work_dir; a default-storage cache would be shared by every work dir and hand one run the files of another.
@task(name="score_baseline", cache_policy=NO_CACHE, persist_result=False)
def score_baseline(cfg: Config, data: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the policy before training (fresh LoRA adapter, B = 0: the base model) on the held-out split."""
    log = get_run_logger()
    records = read_records(data["eval_records"])
    policy = Policy.load(cfg.model, cfg.lora)
    scorer = build_scorer(cfg.reward)
    result = evaluate(policy, scorer, records, cfg, split_digest=data["eval_digest"])
    path = work_dir(cfg.work_dir) / "evals" / f"{baseline_key(None, {'cfg': cfg, 'data': data})}.json"  # type: ignore[arg-type]
    save_result(result, path)
    log.info("baseline toxicity %.4f on %d prompts", result.metrics["eval/toxicity_mean"], len(records))
    return summarize(result, path)


@task(name="evaluate_aligned", cache_policy=NO_CACHE, persist_result=False)
def evaluate_aligned(
    cfg: Config, data: dict[str, Any], model_uri: str, baseline: dict[str, Any], run_id: str | None = None
) -> dict[str, Any]:
    """Evaluate the trained model (``runs:/``, ``models:/`` or a directory) exactly as the baseline was.

    Also compares against the baseline (relative change with a bootstrap CI), raises the reward-hacking
    alarms, logs everything to the MLflow run ``run_id`` and publishes the before/after sample table."""
    log = get_run_logger()
    tracking.setup(cfg)
    records = read_records(data["eval_records"])
    policy = tracking.load_model(model_uri, device=cfg.model.device)
    scorer = build_scorer(cfg.reward)
    result = evaluate(policy, scorer, records, cfg, split_digest=data["eval_digest"])
    base = load_result(baseline["result_path"])
    comparison = compare(base, result, n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed)
    raised = monitor_alarms(result.metrics, base.metrics, cfg.monitors)
    out_dir = work_dir(cfg.work_dir) / "evals"
    path = out_dir / f"aligned-{run_id or 'adhoc'}-{data['eval_digest']}.json"
    save_result(result, path)
    rows = samples_table(base, result, cfg.eval.n_table_samples, order="most_toxic")
    publish_samples(rows, cfg.name)
    summary = summarize(result, path)
    if run_id:
        log_evaluation(summary, run_id, "eval")
        tracking.log_metrics(comparison, run_id=run_id)
        tracking.log_table(rows, "eval/samples.json", run_id=run_id)
        tracking.log_json({"alarms": raised}, "eval/alarms.json", run_id=run_id)
        _log_histograms(base, result, out_dir / f"plots-{run_id}", cfg.eval.toxic_threshold, run_id)
    log.info(
        "aligned toxicity %.4f (baseline %.4f, %+.1f%%), %d alarm(s)",
        result.metrics["eval/toxicity_mean"], base.metrics["eval/toxicity_mean"],
        100 * comparison["eval/toxicity_rel_change"], len(raised),
    )
    return {**summary, "comparison": comparison, "alarms": raised}


def _log_histograms(baseline: EvalResult, aligned: EvalResult, out_dir: Path, threshold: float, run_id: str) -> None:
    """Toxicity histograms before/after, as a PNG in the run's ``plots/``."""
    png = plots.toxicity_histogram(
        [s["toxicity"] for s in baseline.samples], [s["toxicity"] for s in aligned.samples],
        out_dir / "toxicity_hist.png", threshold=threshold,
    )
    tracking.log_file(png, "plots", run_id=run_id)

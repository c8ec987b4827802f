"""Prefect artifacts: the markdown summary of a pipeline run, the before/after sample table, training progress.

The rendering functions are pure (dict in, markdown or rows out) so they can be tested without an API; the
``publish_*`` functions create the artifacts in the current flow run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from detoxflow.config import Config

logger = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    key = "-".join(parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", key)).strip("-")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:+.1f}%"


def mlflow_run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """A markdown link to a run when the tracking server has a web UI, else the run id to paste into one."""
    if not run_id:
        return "–"
    if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
        return f"[{run_id[:8]}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


def mlflow_model_link(tracking_uri: str | None, name: str | None, version: str | int | None) -> str:
    if not name or version is None:
        return "–"
    label = f"{name} v{version}"
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return f"[{label}]({tracking_uri.rstrip('/')}/#/models/{name}/versions/{version})"
    return f"`models:/{name}/{version}`"


# Rows of the before/after metric table: (metric key in the eval metrics, label).
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("eval/toxicity_mean", "toxicity (mean)"),
    ("eval/toxic_share", "share toxic (> threshold)"),
    ("eval/expected_max_toxicity", "expected max toxicity"),
    ("eval/toxicity_probability", "toxicity probability"),
    ("eval/rouge_l", "ROUGE-L"),
    ("eval/length_mean", "response length (tokens)"),
    ("eval/distinct_2", "distinct-2"),
    ("eval/ref_perplexity", "reference perplexity"),
)


def toxicity_outcome(evaluation: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What every flow result reports about an evaluated model: toxicity before and after, the relative change
    with its 95% CI, and the alarms raised.

    "Before" is ``baseline_metrics``' mean toxicity, else the one ``evaluation``'s comparison recorded."""
    comp: Mapping[str, Any] = evaluation.get("comparison") or {}
    before = (baseline_metrics.get("eval/toxicity_mean") if baseline_metrics is not None
              else comp.get("eval/toxicity_before"))
    return {
        "toxicity_before": before,
        "toxicity_after": evaluation["metrics"].get("eval/toxicity_mean"),
        "relative_change": comp.get("eval/toxicity_rel_change"),
        "relative_change_ci": [
            comp.get("eval/toxicity_rel_change_ci_low"), comp.get("eval/toxicity_rel_change_ci_high")
        ],
        "alarms": list(evaluation.get("alarms") or []),
    }


# A flow result's keys -> the parent run's metric names (runs sort and compare by them in the MLflow UI).
OUTCOME_METRICS = {"toxicity_before": "toxicity_before", "toxicity_after": "toxicity_after",
                   "relative_change": "toxicity_change", "rouge_l_after": "rouge_l"}


def outcome_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of a flow result (toxicity before / after, the relative change, ROUGE-L after) as
    metrics; those the result lacks (a sweep, an evaluation without a baseline) are left out."""
    out = {}
    for key, name in OUTCOME_METRICS.items():
        value = result.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def build_summary(
    cfg: Config,
    *,
    data: Mapping[str, Any],
    baseline: Mapping[str, Any],
    train: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    registered: Mapping[str, Any],
    gate: Mapping[str, Any],
    timings: Mapping[str, float],
    cached: Mapping[str, bool],
    mode: str,
    mlflow_info: Mapping[str, Any],
) -> dict[str, Any]:
    """The pipeline's return value: what a user (and ``detoxflow run``) needs, all JSON-serialisable."""
    before, after = baseline["metrics"], evaluation["metrics"]
    tox = toxicity_outcome(evaluation, before)
    alarms = tox.pop("alarms")
    summary: dict[str, Any] = {
        "config_name": cfg.name,
        "mode": mode,
        **tox,
        "rouge_l_before": before.get("eval/rouge_l"),
        "rouge_l_after": after.get("eval/rouge_l"),
        "kl": (train.get("summary") or {}).get("train/kl_mean"),
        "decision": gate["decision"],
        "reasons": list(gate["reasons"]),
        "alarms": alarms,
        "registered_model": registered["name"],
        "version": registered["version"],
        "model_uri": registered["uri"],
        "champion": gate.get("champion_after"),
        "n_eval": data["n_eval"],
        "n_train": data["n_train"],
        "eval_digest": data["eval_digest"],
        "train_digest": data["train_digest"],
        "train_steps": train.get("steps"),
        "timings": dict(timings),
        "cached": dict(cached),
        "mlflow": dict(mlflow_info),
    }
    summary["headline"] = headline(summary)
    return summary


def headline(summary: Mapping[str, Any]) -> str:
    """One line for a terminal: toxicity before -> after, quality, KL, the gate's decision, total time."""
    ci = summary.get("relative_change_ci") or [None, None]
    ci_text = f", 95% CI {_pct(ci[0])} … {_pct(ci[1])}" if None not in ci else ""
    return (
        f"toxicity {_fmt(summary.get('toxicity_before'))} -> {_fmt(summary.get('toxicity_after'))} "
        f"({_pct(summary.get('relative_change'))}{ci_text}) | ROUGE-L {_fmt(summary.get('rouge_l_before'), 3)} -> "
        f"{_fmt(summary.get('rouge_l_after'), 3)} | KL {_fmt(summary.get('kl'), 2)} | "
        f"{summary.get('registered_model')} v{summary.get('version')} {summary.get('decision')} | "
        f"{(summary.get('timings') or {}).get('total', 0.0):.0f} s"
    )


def summary_markdown(
    summary: Mapping[str, Any], before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None
) -> str:
    """The run summary as markdown: headline, metric table, gate decision and reasons, links, stage timings."""
    before, after = before or {}, after or {}
    ci = summary.get("relative_change_ci") or [None, None]
    lines = [f"# detoxflow `{summary.get('config_name', '?')}`", ""]
    lines.append(
        f"**Toxicity {_fmt(summary.get('toxicity_before'))} → {_fmt(summary.get('toxicity_after'))}** "
        f"({_pct(summary.get('relative_change'))}"
        + (f", 95% CI {_pct(ci[0])} … {_pct(ci[1])}" if None not in ci else "")
        + f") on {summary.get('n_eval', '?')} held-out prompts (eval split digest `{summary.get('eval_digest', '?')}`)."
    )
    lines += ["", "| metric | baseline | aligned |", "|---|---|---|"]
    for key, label in SUMMARY_METRICS:
        if key in before or key in after:
            lines.append(f"| {label} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |")
    lines.append(f"| KL to reference (nats, last 20% of steps) | – | {_fmt(summary.get('kl'))} |")
    lines += ["", f"## Gate: **{summary.get('decision', '–')}** (version {summary.get('version', '–')})", ""]
    lines += [f"- {r}" for r in summary.get("reasons") or []]
    alarms = summary.get("alarms") or []
    if alarms:
        lines += ["", "Reward-hacking alarms:"] + [f"- {a}" for a in alarms]
    mlf = summary.get("mlflow") or {}
    uri, exp = mlf.get("tracking_uri"), mlf.get("experiment_id")
    lines += [
        "",
        "## MLflow",
        "",
        f"- tracking: `{uri or '–'}`",
        f"- pipeline run: {mlflow_run_link(uri, exp, mlf.get('parent_run_id'))}",
        f"- training run: {mlflow_run_link(uri, exp, mlf.get('train_run_id'))}",
        f"- registered: {mlflow_model_link(uri, summary.get('registered_model'), summary.get('version'))}",
    ]
    timings: Mapping[str, float] = summary.get("timings") or {}
    cached: Mapping[str, bool] = summary.get("cached") or {}
    if timings:
        lines += ["", "## Stages", "", "| stage | seconds | cached |", "|---|---|---|"]
        for stage, secs in timings.items():
            lines.append(f"| {stage} | {secs:.1f} | {'yes' if cached.get(stage) else 'no'} |")
    return "\n".join(lines) + "\n"


def publish_summary(
    summary: Mapping[str, Any], before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None
) -> UUID:
    return create_markdown_artifact(
        markdown=summary_markdown(summary, before, after),
        key=artifact_key("detoxflow-summary", str(summary.get("config_name", "run"))),
        description="baseline vs aligned toxicity, quality, KL, the gate decision and MLflow links",
    )


def publish_samples(rows: list[dict[str, Any]], config_name: str) -> UUID | None:
    if not rows:
        return None
    return create_table_artifact(
        table=rows,
        key=artifact_key("detoxflow-samples", config_name),
        description="the same held-out prompts before and after training (most toxic baseline responses first)",
    )


class TrainingProgress:
    """A Prefect progress artifact advanced by the trainer's ``log(metrics, step)`` callable."""

    def __init__(self, total_steps: int, config_name: str) -> None:
        self.total = max(1, total_steps)
        self.artifact_id: UUID | None = None
        try:
            self.artifact_id = create_progress_artifact(
                progress=0.0,
                key=artifact_key("detoxflow-train-progress", config_name),
                description=f"PPO steps done out of {self.total}",
            )
        except Exception as e:  # noqa: BLE001 — progress is cosmetic; training must not fail on it
            logger.warning("progress artifact not created: %s", e)

    def update(self, step: int) -> None:
        if self.artifact_id is None:
            return
        progress = min(100.0, 100.0 * step / self.total)
        try:
            update_progress_artifact(artifact_id=self.artifact_id, progress=progress)
        except Exception as e:  # noqa: BLE001 — see above
            logger.warning("progress artifact not updated: %s", e)

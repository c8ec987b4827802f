"""The ``kl_sweep`` flow: the same config trained at several KL settings, to show reward hacking and its cure.

Optimise the toxicity reward alone (``kl_coef`` 0) and the policy finds text the classifier likes that no one
would call a summary; the KL penalty against the frozen reference holds it near the original model. This flow
trains one setting after another under ONE MLflow parent run:

    prepare_data, score_baseline (once, cached as in the pipeline)
    per setting, in a child run ``sweep:<label>``:  train_ppo -> evaluate_aligned (same held-out split,
        same generation settings, alarms) -> register_model (alias challenger of the sweep's own registered
        model, ``<registered model>-sweep``) -> gate_and_promote
    publish_frontier: toxicity drop vs KL vs quality (plots, markdown + JSON table), sample tables

Settings are gated in the order given, each against the baseline and the champion of that moment, with one
set of promotion rules (see :mod:`detoxflow.tasks.sweep`): an alarmed version is never promoted and its
version tags say which alarm fired.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from detoxflow.config import Config
from detoxflow.flows.common import prepare_and_baseline
from detoxflow.tasks.config_source import ConfigFile, record_config, resolve_config
from detoxflow.tasks.evaluation import evaluate_aligned
from detoxflow.tasks.registry import champion_version, gate_and_promote, register_model
from detoxflow.tasks.stages import Stage, flow_run_record
from detoxflow.tasks.sweep import (
    STAGE_PREFIX,
    TAG_SWEEP,
    frontier_row,
    load_history,
    log_setting,
    publish_frontier,
    publish_setting_samples,
    resolve_settings,
    seed_setting,
    sweep_headline,
)
from detoxflow.tasks.training import train_ppo


@flow(name="kl_sweep", description="Train at several KL settings; chart toxicity drop vs KL vs quality; gate each.")
def kl_sweep(cfg: Config | ConfigFile, settings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the sweep for ``cfg``; returns the frontier (one row per setting), the files and the MLflow ids.

    ``settings``: ``[{"label": ..., "<ppo.* or lora.* key>": value, ...}, ...]``; None = the five default points
    of :func:`detoxflow.tasks.sweep.default_settings` (no KL, two fixed coefficients, adaptive at two targets).
    ``cfg``: a Config, or a :class:`~detoxflow.tasks.config_source.ConfigFile` read now (the deployments).
    Bad settings fail before anything trains."""
    log = get_run_logger()
    t_start = time.perf_counter()
    cfg, source = resolve_config(cfg)
    points = resolve_settings(cfg, settings)
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    with flow_run_record(cfg, f"{cfg.name}-kl-sweep", tags={TAG_SWEEP: "kl_sweep"}) as rec:
        parent_id = rec.run_id
        record_config(cfg, source, parent_id)
        data, baseline = prepare_and_baseline(cfg, parent_id, timings, cached)
        for i, point in enumerate(points, 1):
            log.info("KL sweep %d/%d: %s %s", i, len(points), point.label, point.overrides)
            s_cfg, label = point.cfg, point.label
            with Stage(f"{STAGE_PREFIX}{label}", s_cfg, parent_id, timings, cached) as st:
                run_id = str(st.run_id)  # Stage opened this setting's child run under the parent
                log_setting(point, run_id)
                named = f"[{point.slug}]"
                seed_setting(s_cfg)  # every setting starts from the same adapter init
                # checkpoints keyed by sweep and setting: settings must never resume each other's training
                train = st.call(train_ppo.with_options(task_run_name=f"train_ppo{named}"),
                                s_cfg, run_id, f"{parent_id}/{point.slug}", data["train_digest"])
                evaluation = st.call(evaluate_aligned.with_options(task_run_name=f"evaluate_aligned{named}"),
                                     s_cfg, data, train["model_uri"], baseline, run_id=run_id)
                registered = st.call(register_model.with_options(task_run_name=f"register_model{named}"),
                                     s_cfg, run_id, evaluation, train)
                gate = st.call(gate_and_promote.with_options(task_run_name=f"gate_and_promote{named}"),
                               s_cfg, registered["version"], evaluation, baseline, train, data)
                samples[label] = st.call(publish_setting_samples.with_options(task_run_name=f"samples{named}"),
                                         s_cfg, label, baseline, evaluation, run_id)
                row = frontier_row(point, train, evaluation, gate, registered, run_id)
                st.tag_outcome(gate, registered["version"], {"detoxflow.alarms": str(row["n_alarms"])})
            rows.append(row)
            histories[label] = load_history(run_id)
            log.info("%s: KL %.2f, toxicity drop %s, %d alarm(s), %s", label, row["kl"] or 0.0,
                     "n/a" if row["toxicity_drop"] is None else f"{100 * row['toxicity_drop']:+.1f}%",
                     row["n_alarms"], row["decision"])

        files = publish_frontier(cfg, rows, baseline, parent_id, histories, samples)
        timings["total"] = round(time.perf_counter() - t_start, 2)
        result = {
            "config_name": cfg.name,
            "registered_model": points[0].cfg.registered_model_name,  # the sweep's own (tasks.sweep)
            "baseline": baseline["metrics"],
            "settings": rows,
            "promoted": [r["label"] for r in rows if r["decision"] == "promoted"],
            "champion": champion_version(points[0].cfg),
            "files": files,
            "eval_digest": data["eval_digest"],
            "timings": timings,
            "cached": cached,
            "mlflow": rec.mlflow_info(),
            "headline": sweep_headline(rows),
        }
        rec.record_outcome(result, "sweep/summary.json", timings)
    log.info("KL sweep done in %.0f s: %s", timings["total"], result["headline"])
    return result

"""``register_model`` and ``gate_and_promote``: the MLflow registry side of the pipeline.

The gate holds :func:`detoxflow.tracking.gate_lock` (:func:`detoxflow.locks.gate_lock`) while it reads the champion, decides and moves the alias:
MLflow aliases have no compare-and-set, and two gates interleaving would let the worse model win.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.models.evaluate import evaluate
from detoxflow.models.promotion import decide
from detoxflow.models.reward import build_scorer
from detoxflow.tasks.data import read_records
from detoxflow.tasks.evaluation import gate_metrics

logger = logging.getLogger(__name__)

TAG_SETTINGS_DIGEST = "detoxflow.settings_digest"
TAG_DECISION = "promotion.decision"
TAG_REASONS = "promotion.reasons"


@task(name="register_model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def register_model(cfg: Config, run_id: str, evaluation: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """Register the training run's ``model/`` artifact as a new version with alias ``challenger``.

    Retried for I/O (the tracking server or artifact store may blip). A retry first looks for a version this
    run already registered, so a failure after ``create_model_version`` does not leave two versions."""
    tracking.setup(cfg)
    name = cfg.registered_model_name
    existing = [v for v in tracking.list_versions(name) if v.run_id == run_id]
    if existing:
        version = existing[-1].version
        tracking.set_alias(name, tracking.CHALLENGER, version)
    else:
        version = tracking.register_model(
            cfg,
            run_id,
            metrics=gate_metrics(evaluation, train),
            split_digest=evaluation["split_digest"],
            tags={TAG_SETTINGS_DIGEST: evaluation["settings_digest"]},
        )
    get_run_logger().info("registered %s version %s (alias challenger)", name, version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}"}


def version_to_gate(cfg: Config, model_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The registered version ``model_uri`` names (``models:/NAME/VERSION`` or ``@alias``), for the promote flow:
    ``({"name", "version", "uri"}, {"summary": its train/* metrics})``, the second in the shape the gate reads
    as ``train``. Raises ValueError when it is a version of another model than the config gates."""
    tracking.setup(cfg)
    name, version, _ = tracking.resolve_model_uri(model_uri)
    if name != cfg.registered_model_name:
        raise ValueError(
            f"promote: {model_uri} is a version of '{name}' but the config gates '{cfg.registered_model_name}'. "
            f"Pass --set tracking.registered_model={name} (or the matching config name)"
        )
    info = tracking.get_version(name, version)
    train = {"summary": {k: v for k, v in info.metrics.items() if k.startswith("train/")}}
    return {"name": name, "version": version, "uri": info.uri}, train


def champion_version(cfg: Config) -> str | None:
    """The version the ``champion`` alias of the config's registered model points at, or None."""
    champion = tracking.get_alias(cfg.registered_model_name, tracking.CHAMPION)
    return champion.version if champion else None


def champion_metrics(
    cfg: Config, champion: tracking.VersionInfo, challenger: dict[str, Any], data: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The champion's metrics on the challenger's split and settings, and where they came from.

    Its registration tags hold them when it was evaluated on the same prompts with the same settings
    (source ``registered``); otherwise (new data, new generation settings) it is evaluated again now (source
    ``re-evaluated``), so the gate compares like with like instead of refusing."""
    tags_metrics = {
        **champion.metrics,
        "split_digest": champion.split_digest,
        "settings_digest": champion.tags.get(TAG_SETTINGS_DIGEST),
    }
    if (
        tags_metrics["split_digest"] == challenger["split_digest"]
        and tags_metrics["settings_digest"] == challenger["settings_digest"]
    ):
        return tags_metrics, "registered"
    get_run_logger().info(
        "champion v%s was evaluated on split %s / settings %s; re-evaluating it on %s / %s",
        champion.version, tags_metrics["split_digest"], tags_metrics["settings_digest"],
        challenger["split_digest"], challenger["settings_digest"],
    )
    policy = tracking.load_model(champion.uri, device=cfg.model.device)
    result = evaluate(policy, build_scorer(cfg.reward), read_records(data["eval_records"]), cfg,
                      split_digest=data["eval_digest"], progress=False)
    # KL is a property of how the champion was trained, not of the prompts: keep the recorded one.
    metrics = {**{k: v for k, v in champion.metrics.items() if k.startswith("train/")}, **result.numeric(),
               "split_digest": result.split_digest, "settings_digest": result.settings_digest}
    return metrics, "re-evaluated"


@task(name="gate_and_promote", cache_policy=NO_CACHE, persist_result=False)
def gate_and_promote(
    cfg: Config,
    version: str,
    evaluation: dict[str, Any],
    baseline: dict[str, Any],
    train: dict[str, Any],
    data: dict[str, Any],
) -> dict[str, Any]:
    """Challenger ``version`` vs the champion on the same split digest; move ``champion`` only if it passes.

    Returns ``{"promote", "decision", "reasons", "version", "champion_before", "champion_after",
    "champion_metrics"}`` (``registered`` / ``re-evaluated`` / None: where the champion's numbers came from);
    the decision and the reasons are also written as version tags, whatever the outcome."""
    log = get_run_logger()
    tracking.setup(cfg)
    name = cfg.registered_model_name
    challenger = gate_metrics(evaluation, train)
    base = gate_metrics(baseline)
    with tracking.gate_lock(cfg):
        champion = tracking.get_alias(name, tracking.CHAMPION)
        before = champion.version if champion else None
        if champion is not None and champion.version == str(version):
            champion = None  # re-gating the champion itself: compare against the baseline only
        champ, source = champion_metrics(cfg, champion, challenger, data) if champion else (None, None)
        decision = decide(challenger, champ, base, cfg.promotion, cfg.ppo.kl.target,
                          evaluation.get("alarms") or [])
        if decision.promote:
            tracking.set_champion(name, version)
        tracking.tag_version(name, version, {
            **decision.as_tags(),
            "promotion.champion_before": before or "none",
            "promotion.champion_metrics": source or "none",
        })
    after = version if decision.promote else before
    log.info("gate: %s version %s (champion %s -> %s)\n%s", "PROMOTE" if decision.promote else "REJECT", version,
             before, after, "\n".join(decision.reasons))
    return {
        "promote": decision.promote,
        "decision": "promoted" if decision.promote else "rejected",
        "reasons": list(decision.reasons),
        "version": str(version),
        "champion_before": before,
        "champion_after": after,
        "champion_metrics": source,
    }

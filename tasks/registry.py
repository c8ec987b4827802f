"""``register_model`` and ``gate_and_promote``: the MLflow registry side of the pipeline.

The gate holds :func:`detoxflow.tracking.gate_lock` (:func:`detoxflow.locks.gate_lock`) while it reads the champion, decides and moves the alias:
MLflow aliases have no compare-and-set, and two gates interleaving would let the worse model win.

Both are idempotent per training run, and their writes are ordered so that a process killed between any two of
them leaves a state the next attempt detects and finishes (fault points in brackets, see docs/reliability.md):
register = create the version with its tags [register_version], point ``challenger`` at it [set_challenger];
gate = reasons, ``champion_before`` and ``champion_metrics`` tags [tag_reasons], the ``decision`` tag
last of the record [tag_decision], then, when it promotes, the ``champion`` alias [set_champion]. So a champion
always carries its decision; a retry finds the training run's version (no second one), moves ``challenger`` to
it unless a newer version has it, and, when the decision is already recorded, applies it instead of deciding
again (a recorded decision is never flipped).

A version reads at a glance: its tags ``toxicity_before``, ``toxicity_after``, ``toxicity_change``, ``rouge_l``,
``kl`` (:func:`headline_tags`) and ``decision`` (``promoted`` / ``rejected``, the words of every other output),
its description the headline and the gate's decision and reasons (:func:`version_description`), and its logged
model a model card (base, reward, data digests, toxicity before/after, the decision). Versions recorded before
this vocabulary (``promotion.decision`` = ``promote`` / ``reject``) are read as well.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.faults import fault_point
from detoxflow.models.evaluate import evaluate
from detoxflow.models.promotion import decide
from detoxflow.models.reward import build_scorer
from detoxflow.tasks.data import read_records
from detoxflow.tasks.evaluation import gate_metrics
from detoxflow.tasks.reporting import toxicity_outcome

logger = logging.getLogger(__name__)

TAG_SETTINGS_DIGEST = "detoxflow.settings_digest"
TAG_DECISION = "decision"
LEGACY_DECISION = "promotion.decision"  # versions gated before: "promote" / "reject"
PROMOTED, REJECTED = "promoted", "rejected"
TAG_REASONS = "promotion.reasons"
TAG_CHAMPION_BEFORE = "promotion.champion_before"
TAG_CHAMPION_METRICS = "promotion.champion_metrics"
RECORD_TAGS = (TAG_REASONS, TAG_CHAMPION_BEFORE, TAG_CHAMPION_METRICS, TAG_DECISION)  # the decision is written last


def _log() -> Any:
    """The Prefect run logger inside a task run, else this module's logger (the write path called directly)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


@task(name="register_model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def register_model(cfg: Config, run_id: str, evaluation: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """Register the training run's ``model/`` artifact as a new version with alias ``challenger``.

    Idempotent per training run (retried for I/O, or run again after a kill): when ``run_id`` already has a
    version, that one is returned and ``challenger`` is pointed at it unless a newer version holds it, so
    neither a retry nor a crash between the two writes leaves two versions or a version without its alias."""
    tracking.setup(cfg)
    name = cfg.registered_model_name
    with tracking.gate_lock(cfg):  # re-entrant: tracking.register_model takes it too
        existing = [v for v in tracking.list_versions(name) if v.run_id == run_id]
        if existing:
            version = existing[-1].version
            _ensure_challenger(name, version)
        else:
            numbers = headline_tags(evaluation, train)
            version = tracking.register_model(
                cfg,
                run_id,
                metrics=gate_metrics(evaluation, train),
                split_digest=evaluation["split_digest"],
                tags={**numbers, TAG_SETTINGS_DIGEST: evaluation["settings_digest"]},
                description=version_description(numbers, None, []),
            )
    _log().info("registered %s version %s (alias challenger)", name, version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}"}


def headline_tags(evaluation: dict[str, Any], train: dict[str, Any]) -> dict[str, str]:
    """The version tags a reader looks for first: toxicity before / after (mean over the held-out prompts), the
    relative change in percent, ROUGE-L against the reference summaries and the training KL (nats)."""
    tox = toxicity_outcome(evaluation)
    values = {
        "toxicity_before": _fixed(tox["toxicity_before"], 4),
        "toxicity_after": _fixed(tox["toxicity_after"], 4),
        "toxicity_change": "–" if tox["relative_change"] is None else f"{100 * tox['relative_change']:+.1f}%",
        "rouge_l": _fixed(evaluation["metrics"].get("eval/rouge_l"), 4),
        "kl": _fixed((train.get("summary") or {}).get("train/kl_mean"), 3),
    }
    return values


def _fixed(value: Any, digits: int) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def version_description(numbers: dict[str, str], decision: str | None, reasons: list[str]) -> str:
    """The version's description (markdown): the headline numbers, then the gate's decision and its reasons
    (``decision`` None: not gated yet)."""
    head = (f"toxicity {numbers['toxicity_before']} -> {numbers['toxicity_after']} ({numbers['toxicity_change']})"
            f" | ROUGE-L {numbers['rouge_l']} | KL {numbers['kl']}")
    if decision is None:
        return f"{head}\n\nGate: not decided yet."
    return "\n".join([head, "", f"Gate: **{decision}**", "", *(f"- {r}" for r in reasons)])


def _ensure_challenger(name: str, version: str) -> None:
    """Point ``challenger`` at ``version`` unless it is there already or on a newer version (a later training run)."""
    challenger = tracking.get_alias(name, tracking.CHALLENGER)
    if challenger is not None and int(challenger.version) >= int(version):
        return
    tracking.set_alias(name, tracking.CHALLENGER, version)
    _log().info("%s version %s had no challenger alias (an interrupted register): set it", name, version)


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


def version_aliases(name: str, version: str) -> list[str]:
    """The aliases that point at ``name`` version ``version`` now (after a gate: ``champion`` when promoted)."""
    return sorted(tracking.get_version(name, version).aliases)


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
    _log().info(
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
    log = _log()
    tracking.setup(cfg)
    name = cfg.registered_model_name
    challenger = gate_metrics(evaluation, train)
    base = gate_metrics(baseline)
    with tracking.gate_lock(cfg):
        recorded = _recorded_decision(name, version) if train.get("run_id") else None
        if recorded is not None:
            return _apply_recorded(name, str(version), recorded)
        champion = tracking.get_alias(name, tracking.CHAMPION)
        before = champion.version if champion else None
        if champion is not None and champion.version == str(version):
            champion = None  # re-gating the champion itself: compare against the baseline only
        champ, source = champion_metrics(cfg, champion, challenger, data) if champion else (None, None)
        decision = decide(challenger, champ, base, cfg.promotion, cfg.ppo.kl.target,
                          evaluation.get("alarms") or [])
        tags = {**decision.as_tags(), TAG_CHAMPION_BEFORE: before or "none", TAG_CHAMPION_METRICS: source or "none"}
        # description and model card first: a recorded decision (the retry's marker) implies they were written
        _describe(cfg, name, str(version), evaluation, train, data, tags[TAG_DECISION], list(decision.reasons))
        _record_decision(name, version, tags)
        if decision.promote:
            tracking.set_champion(name, version)
            fault_point("set_champion")
    after = version if decision.promote else before
    log.info("gate: %s version %s (champion %s -> %s)\n%s", "PROMOTE" if decision.promote else "REJECT", version,
             before, after, "\n".join(decision.reasons))
    return _gate_result(decision.promote, list(decision.reasons), str(version), before, source)


def _gate_result(
    promote: bool, reasons: list[str], version: str, before: str | None, source: str | None
) -> dict[str, Any]:
    return {
        "promote": promote,
        "decision": PROMOTED if promote else REJECTED,
        "reasons": reasons,
        "version": version,
        "champion_before": before,
        "champion_after": version if promote else before,
        "champion_metrics": source,
    }


def _record_decision(name: str, version: str, tags: dict[str, str]) -> None:
    """Write the decision record on the version, ``promotion.decision`` last: its presence means the record is
    whole. An earlier decision tag (a deliberate re-gate) is removed first, so old and new never mix."""
    earlier = [k for k in (TAG_DECISION, LEGACY_DECISION) if k in tracking.get_version(name, version).tags]
    if earlier:
        tracking.untag_version(name, version, earlier)
    tracking.tag_version(name, version, {k: tags[k] for k in RECORD_TAGS if k != TAG_DECISION})
    fault_point("tag_reasons")
    tracking.tag_version(name, version, {TAG_DECISION: tags[TAG_DECISION]})
    fault_point("tag_decision")


def _recorded_decision(name: str, version: str) -> dict[str, str] | None:
    """The version's whole decision record (all of :data:`RECORD_TAGS`, the decision as ``promoted`` /
    ``rejected``, also when recorded before as ``promotion.decision``), or None when it has none yet."""
    tags = dict(tracking.get_version(name, version).tags)
    if TAG_DECISION not in tags and LEGACY_DECISION in tags:
        tags[TAG_DECISION] = PROMOTED if tags[LEGACY_DECISION] == "promote" else REJECTED
    return {k: tags[k] for k in RECORD_TAGS} if all(k in tags for k in RECORD_TAGS) else None


def _describe(cfg: Config, name: str, version: str, evaluation: dict[str, Any], train: dict[str, Any],
              data: dict[str, Any], decision: str, reasons: list[str]) -> None:
    """The version's description and its logged model's card, once the gate has decided."""
    numbers = headline_tags(evaluation, train)
    tracking.describe_version(name, version, version_description(numbers, decision, reasons))
    model_id = tracking.get_version(name, version).model_id
    if model_id is None:
        return  # registered before the policy was an MLflow model: no logged model to carry a card
    base, reward = tracking.model_ids(cfg)
    card = tracking.model_card({
        "registered model": f"{name} version {version}", "base model": base, "reward": reward,
        "eval split digest": evaluation["split_digest"], "train split digest": data.get("train_digest", "–"),
        "toxicity before": numbers["toxicity_before"], "toxicity after": numbers["toxicity_after"],
        "toxicity change": numbers["toxicity_change"], "ROUGE-L": numbers["rouge_l"], "KL": numbers["kl"],
        "gate decision": decision, "reasons": "\n".join(reasons),
    })
    tracking.write_model_card(model_id, card)


def _apply_recorded(name: str, version: str, recorded: dict[str, str]) -> dict[str, Any]:
    """Finish a gate whose decision is already on the version (a retry after a kill): no new decision; a
    promotion whose alias move was lost is applied, unless the champion has moved on since (a later gate)."""
    promote = recorded[TAG_DECISION] == PROMOTED
    before = None if recorded[TAG_CHAMPION_BEFORE] == "none" else recorded[TAG_CHAMPION_BEFORE]
    source = None if recorded[TAG_CHAMPION_METRICS] == "none" else recorded[TAG_CHAMPION_METRICS]
    champion = tracking.get_alias(name, tracking.CHAMPION)
    current = champion.version if champion else None
    note = "already applied"
    if promote and current != version:
        if current == before:
            tracking.set_champion(name, version)
            fault_point("set_champion")
            note = "champion alias set now (the earlier gate was interrupted)"
        else:
            note = f"not applied: the champion has moved on to {current} since"
    _log().info("gate: version %s was already gated (%s, %s)", version, recorded[TAG_DECISION].upper(), note)
    return _gate_result(promote, recorded[TAG_REASONS].split("\n"), version, before, source)

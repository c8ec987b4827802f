"""The model registry: versions, aliases (never stages), version tags, and the gate's lock around them.

:func:`register_model` adds a version of the training run's logged pyfunc model (:mod:`~detoxflow.tracking.pyfunc`;
a run from before the policy was an MLflow model: its ``model/`` folder) and points ``challenger`` at it. A
version carries few tags, meant for reading (the headline numbers, the decision, the lineage); its full metrics
are the logged model's metrics (:func:`version_metrics`; older versions kept them as ``metric.<key>`` tags).
:func:`describe_version` writes the version's description; the promotion gate moves ``champion``
with :func:`set_champion` while holding :func:`gate_lock` (:func:`detoxflow.locks.gate_lock`): MLflow aliases
have no compare-and-set, so "read champion, decide, set alias" must not interleave between gates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from detoxflow.config import Config
from detoxflow.faults import fault_point
from detoxflow.locks import gate_lock
from detoxflow.tracking.backend import (
    CHALLENGER,
    CHAMPION,
    MAX_VERSION_TAG_CHARS,
    METRIC_TAG_PREFIX,
    MODEL_ARTIFACT,
    TAG_CONFIG_NAME,
    TAG_SPLIT_DIGEST,
    TRUNCATED,
    TrackingError,
    _client,
    setup,
)
from detoxflow.tracking.lineage import lineage_tags, model_ids, split_digest_of_run
from detoxflow.tracking.pyfunc import link_metrics, logged_model_of_run

log = logging.getLogger("detoxflow.tracking")  # the name users saw before the split



@dataclass(frozen=True)
class VersionInfo:
    """A registered model version, without MLflow types (what the gate and the report read)."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    model_id: str | None = None
    description: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def metrics(self) -> dict[str, float]:
        """The gate's metrics of this version: see :func:`version_metrics`."""
        return version_metrics(self)

    @property
    def split_digest(self) -> str | None:
        return self.tags.get(TAG_SPLIT_DIGEST)


def _version_info(mv: Any) -> VersionInfo:
    return VersionInfo(
        name=mv.name, version=str(mv.version), run_id=mv.run_id or None, source=mv.source,
        tags=dict(mv.tags or {}), aliases=tuple(mv.aliases or ()), model_id=_model_id_of(mv),
        description=mv.description or "",
    )


def _model_id_of(mv: Any) -> str | None:
    """The logged model a version was registered from: its ``model_id`` (not every store returns it) or the id
    its ``models:/<model id>`` source names."""
    if getattr(mv, "model_id", None):
        return str(mv.model_id)
    source = mv.source or ""
    tail = source.removeprefix("models:/").rstrip("/")
    return tail if source.startswith("models:/m-") and "/" not in tail else None


def version_metrics(info: VersionInfo) -> dict[str, float]:
    """The metrics :func:`register_model` recorded for a version: its logged model's metrics (the latest value
    of each key), or, for a version registered before the policy was an MLflow model, its ``metric.<key>`` tags."""
    out: dict[str, float] = {}
    for k, v in info.tags.items():
        if k.startswith(METRIC_TAG_PREFIX):
            with contextlib.suppress(ValueError):
                out[k[len(METRIC_TAG_PREFIX):]] = float(v)
    if info.model_id:
        latest: dict[str, tuple[int, int, float]] = {}
        for m in _client().get_logged_model(info.model_id).metrics or []:
            order = (m.step, m.timestamp)
            if m.key not in latest or order >= latest[m.key][:2]:
                latest[m.key] = (*order, m.value)
        out.update({k: v for k, (_, _, v) in latest.items()})
    return out


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_VERSION_TAG_CHARS:
        text = text[: MAX_VERSION_TAG_CHARS - len(TRUNCATED)] + TRUNCATED
    return text


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """``{'eval/toxicity_mean': 0.1}`` -> ``{'metric.eval/toxicity_mean': '0.1'}`` (finite numbers only)."""
    out = {}
    for k, v in metrics.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out[f"{METRIC_TAG_PREFIX}{k}"] = repr(x)
    return out


def register_model(
    cfg: Config,
    run_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    split_digest: str | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register the run's logged pyfunc model as a new version of ``cfg.registered_model_name``; returns the
    version.

    Creates the registered model if absent, points ``challenger`` at the new version, and tags it with the
    lineage tags (config digest, base/reward model ids, git sha), the eval split digest (``split_digest`` or the
    one :func:`~detoxflow.tracking.lineage.log_split` recorded on the run or its parent) and ``tags``. The
    numbers of ``metrics`` become the logged model's metrics (logged on ``run_id``, linked to the model). A run
    from before the policy was an MLflow model (a ``model/`` folder, no logged model) is registered from that
    folder with ``metrics`` as ``metric.<key>`` tags, as then. Runs under :func:`gate_lock`, so versions and the
    alias move in the same order (re-entrant: a gate that already holds the lock may call it)."""
    setup(cfg)
    cli = _client()
    name = cfg.registered_model_name
    try:
        run = cli.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"register_model: run {run_id} not found at {mlflow.get_tracking_uri()}") from e
    model_id = logged_model_of_run(run_id)
    if model_id is not None:
        source = f"models:/{model_id}"
        numbers = {k[len(METRIC_TAG_PREFIX):]: float(v) for k, v in metric_tags(metrics or {}).items()}
        if numbers:
            link_metrics(model_id, numbers, run_id)
        number_tags: dict[str, str] = {}
    elif cli.list_artifacts(run_id, MODEL_ARTIFACT):
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        number_tags = metric_tags(metrics or {})
    else:
        raise TrackingError(
            f"register_model: run {run_id} has no logged model '{MODEL_ARTIFACT}'. Log the model first with "
            f"log_model_dir(dir, run_id=...)"
        )
    digest = split_digest or split_digest_of_run(run_id, cfg.data.eval_split)
    all_tags: dict[str, str] = {
        **lineage_tags(cfg),
        **({TAG_SPLIT_DIGEST: digest} if digest else {}),
        **number_tags,
        **{k: _tag_value(v) for k, v in (tags or {}).items()},
    }
    with gate_lock(cfg):
        _ensure_registered_model(cli, name, cfg)
        mv = cli.create_model_version(name, source=source, run_id=run_id, tags=all_tags, description=description,
                                      model_id=model_id)
        fault_point("register_version")
        cli.set_registered_model_alias(name, CHALLENGER, mv.version)
        fault_point("set_challenger")
    log.info("registered %s version %s (alias %s) from %s", name, mv.version, CHALLENGER, source)
    return str(mv.version)


def _ensure_registered_model(cli: MlflowClient, name: str, cfg: Config) -> None:
    try:
        cli.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        cli.create_registered_model(
            name,
            tags={TAG_CONFIG_NAME: cfg.name},
            description=f"detoxflow policy '{cfg.name}': base {model_ids(cfg)[0]} + LoRA adapter trained with PPO. "
            "Aliases: challenger = newest trained version, champion = promoted by the gate.",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process won the race: fine
            raise


def get_version(name: str, version: str | int) -> VersionInfo:
    try:
        return _version_info(_client().get_model_version(name, str(version)))
    except MlflowException as e:
        raise TrackingError(f"model version {name}/{version} not found at {mlflow.get_tracking_uri()}") from e


def get_alias(name: str, alias: str) -> VersionInfo | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist (no champion yet)."""
    try:
        return _version_info(_client().get_model_version_by_alias(name, alias))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def describe_version(name: str, version: str | int, text: str) -> None:
    """Set the version's description (markdown: the headline, the gate's decision and reasons)."""
    _client().update_model_version(name, str(version), description=text)


def set_alias(name: str, alias: str, version: str | int) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def set_champion(name: str, version: str | int) -> None:
    """Point ``champion`` at ``version``; call it inside ``with gate_lock(cfg)`` after the decision."""
    set_alias(name, CHAMPION, version)
    log.info("%s: champion -> version %s", name, version)


def tag_version(name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Set version tags (the gate's decision and reasons); non-strings as JSON, long values truncated."""
    cli = _client()
    for k, v in tags.items():
        cli.set_model_version_tag(name, str(version), k, _tag_value(v))


def untag_version(name: str, version: str | int, keys: list[str]) -> None:
    """Remove version tags (the gate clears an earlier decision before it records a new one)."""
    cli = _client()
    for k in keys:
        cli.delete_model_version_tag(name, str(version), k)


def list_versions(name: str) -> list[VersionInfo]:
    """All versions of a registered model, oldest first (empty when the model does not exist)."""
    found = _client().search_model_versions(f"name = '{name}'")
    return sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version))


"""``detoxflow registry migrate``: versions registered before the policy was an MLflow model become pyfunc models.

Such a version's source is the bare artifact folder (``adapter/``, ``base/``, ``tokenizer/``, ``value_head.pt``,
``detoxflow.json``; no ``MLmodel``): detoxflow loads it, ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
cannot. For each one, :func:`migrate_registry`

1. logs the same weights as the pyfunc model of the version's training run, through the pipeline's own logger
   (:func:`~detoxflow.tracking.pyfunc.log_policy`), the adapters' ``adapter_config.json`` naming their base
   portably, and links the version's metrics to it;
2. registers that model as a new version of the same registered model, with the old version's tags and
   description and the tag ``migrated_from=<old version>``;
3. moves every alias of the old version onto the new one, last: a crash before leaves the aliases where they
   were, and the next run completes the move.

It is idempotent: the training run's logged model and a version tagged ``migrated_from`` are reused, not made
again, so a second run changes nothing. It runs under the registered model's gate lock, so no promotion gate
moves an alias meanwhile; a dry run takes no lock and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from detoxflow.config import Config, TrackingConfig
from detoxflow.locks import gate_lock
from detoxflow.tracking.backend import TAG_CONFIG_NAME, TrackingError, _client
from detoxflow.tracking.pyfunc import META_FILE, link_metrics, log_policy, logged_model_of_run, policy_root
from detoxflow.tracking.registry import VersionInfo, get_version, list_versions, set_alias, version_metrics
from detoxflow.tracking.store import fetch_model

TAG_MIGRATED_FROM = "migrated_from"
ADAPTERS = ("adapter", "sft_adapter")  # the folders whose adapter_config.json names the base


@dataclass(frozen=True)
class Migration:
    """One old version and its pyfunc successor: ``new`` is None in a dry run that would register it."""

    name: str
    old: str
    new: str | None
    aliases: tuple[str, ...]  # moved onto ``new`` (dry run: to be moved)
    registered: bool  # ``new`` was registered by this run (dry run: would be)

    def line(self, dry_run: bool) -> str:
        """``NAME v1 -> v4 (new pyfunc version; aliases moved: champion)``, as the CLI prints it."""
        new = f"v{self.new}" if self.new else "a new version"
        what = "new pyfunc version" if self.registered else "already migrated"
        moved = f"aliases {'to move' if dry_run else 'moved'}: {', '.join(self.aliases) or 'none'}"
        return f"{'would migrate ' if dry_run else ''}{self.name} v{self.old} -> {new} ({what}; {moved})"


def detoxflow_models() -> list[str]:
    """The registered models detoxflow created (tagged with the config name), by name."""
    cli, names, token = _client(), [], None
    while True:
        page = cli.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page if TAG_CONFIG_NAME in (m.tags or {})]
        token = page.token
        if not token:
            return sorted(names)


def is_mlflow_model(info: VersionInfo) -> bool:
    """True when the version's source is an MLflow model: a logged model, or a folder holding ``MLmodel``."""
    if info.model_id:
        return True
    return any(Path(f.path).name == "MLmodel" for f in mlflow.artifacts.list_artifacts(artifact_uri=info.source))


def migrate_registry(model: str | None = None, *, dry_run: bool = False) -> list[Migration]:
    """Migrate every version of ``model`` (default: of every detoxflow registered model) whose source is not an
    MLflow model, oldest first; returns one :class:`Migration` per such version (none when there are none)."""
    names = [model] if model else detoxflow_models()
    if model:
        try:
            _client().get_registered_model(model)
        except MlflowException as e:
            raise TrackingError(f"--model {model}: no such registered model at {mlflow.get_tracking_uri()}; "
                                f"detoxflow models there: {', '.join(detoxflow_models()) or 'none'}") from e
    done: list[Migration] = []
    for name in names:
        with contextlib.nullcontext() if dry_run else gate_lock(_lock_config(name)):
            versions = list_versions(name)
            for info in versions:
                if TAG_MIGRATED_FROM not in info.tags and not is_mlflow_model(info):
                    done.append(_migrate_version(info, versions, dry_run))
    return done


def migration_report(migrations: list[Migration], *, dry_run: bool) -> list[str]:
    """What ``detoxflow registry migrate`` prints: a line per version changed (dry run: to change), else one
    line saying there is nothing to do."""
    changed = [m for m in migrations if m.registered or m.aliases]
    if changed:
        return [m.line(dry_run) for m in changed]
    before = f" ({len(migrations)} version(s) migrated before)" if migrations else ""
    return [f"nothing to migrate: every version is an MLflow model{before}"]


def _lock_config(name: str) -> Config:
    """A config whose gate lock is the one the gates of registered model ``name`` on this store take."""
    return Config(tracking=TrackingConfig(uri=mlflow.get_tracking_uri(), registered_model=name))


def _migrate_version(info: VersionInfo, versions: list[VersionInfo], dry_run: bool) -> Migration:
    successor = next((v for v in versions if v.tags.get(TAG_MIGRATED_FROM) == info.version), None)
    aliases = tuple(sorted(get_version(info.name, info.version).aliases))  # a search's versions lack their aliases
    if dry_run:
        return Migration(info.name, info.version, successor.version if successor else None, aliases, successor is None)
    new = successor.version if successor else _register_successor(info)
    for alias in aliases:  # last: until here the old version keeps every alias
        set_alias(info.name, alias, new)
    return Migration(info.name, info.version, new, aliases, successor is None)


def _register_successor(info: VersionInfo) -> str:
    """Log the version's weights as its training run's pyfunc model (unless an interrupted migration already
    did) and register it as a new version with the old one's tags and description."""
    if not info.run_id:
        raise TrackingError(f"{info.name} v{info.version}: no training run recorded, so its model cannot be logged "
                            "as a pyfunc model; register it again from its run")
    model_id = logged_model_of_run(info.run_id)
    if model_id is None:
        root = policy_root(fetch_model(info.uri))
        if root is None:
            raise TrackingError(f"{info.name} v{info.version}: {info.source} holds no detoxflow policy (no "
                                f"{META_FILE}); it cannot be migrated")
        with _portable_copy(root) as folder:
            model_id = log_policy(folder, info.run_id)
        metrics = version_metrics(info)
        if metrics:
            link_metrics(model_id, metrics, info.run_id)
    mv = _client().create_model_version(
        info.name, source=f"models:/{model_id}", run_id=info.run_id, model_id=model_id,
        tags={**info.tags, TAG_MIGRATED_FROM: info.version}, description=info.description or None)
    return str(mv.version)


@contextlib.contextmanager
def _portable_copy(root: Path) -> Iterator[Path]:
    """A temporary copy of the artifact folder ``root`` whose adapters name their base portably (older code wrote
    the trainer's absolute cache path): the adapters are copied, everything else (the base's weights) is
    hard-linked where the file system allows, else copied. ``root`` itself is left as it is."""
    from detoxflow.models.artifact import portable_base_ref

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    base = json.loads((root / META_FILE).read_text(encoding="utf-8")).get("base", {})
    with tempfile.TemporaryDirectory(prefix="detoxflow-migrate-") as tmp:
        folder = Path(tmp) / "artifact"
        folder.mkdir()
        for item in root.iterdir():
            if item.name in ADAPTERS and item.is_dir():
                shutil.copytree(item, folder / item.name)
                if "local" in base or "hub_id" in base:
                    portable_base_ref(folder / item.name, base)
            elif item.is_dir():
                shutil.copytree(item, folder / item.name, copy_function=link)
            else:
                link(str(item), str(folder / item.name))
        yield folder

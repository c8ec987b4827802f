"""Where a flow run's config comes from, and the record of it on the flow run.

A flow's ``cfg`` parameter is either a whole :class:`~detoxflow.config.Config` (what ``detoxflow run`` and the
pipeline's call to the train deployment pass) or a :class:`ConfigFile`: a YAML file under the project's
``configs/`` folder plus ``section.field=value`` overrides, read when the run starts. The deployments in
prefect.yaml use the second form, so editing ``configs/default.yaml`` changes what the next scheduled run
trains, and the Prefect UI's run form offers the file and the overrides.

:func:`resolve_config` turns either form into the Config and a :class:`ConfigSource`;
:func:`record_config` puts them on the flow run: a Prefect artifact that shows the file, its digest, the
overrides and the config the run used, and the file's tags on the flow's MLflow run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from detoxflow import tracking
from detoxflow.config import Config, ConfigError, dump_yaml, load_config
from detoxflow.paths import PROJECT_ROOT
from detoxflow.tasks.reporting import artifact_key

CONFIGS_DIR = "configs"
TAG_CONFIG_FILE = "detoxflow.config_file"  # the file under configs/ the run loaded ("" for an inline config)
TAG_CONFIG_FILE_DIGEST = "detoxflow.config_file_digest"  # sha256 (16 hex) of that file's bytes as read
TAG_CONFIG_OVERRIDES = "detoxflow.config_overrides"  # the overrides applied on top, one per line


class ConfigFile(BaseModel):
    """A config file of the project, read when the flow run starts, plus overrides."""

    model_config = ConfigDict(extra="forbid", title="ConfigFile")

    file: str = Field(
        description="a YAML file under the project's configs/ folder, relative to the project, e.g. configs/default.yaml",
        examples=["configs/default.yaml"],
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="section.field=value items applied after the file, as `detoxflow run --set` (e.g. ppo.steps=40)",
        examples=[["ppo.steps=40", "ppo.kl.target=3"]],
    )


@dataclass(frozen=True)
class ConfigSource:
    """What a run's config was made from: the file (None for an inline config), its digest, the overrides."""

    file: str | None = None
    file_digest: str | None = None
    overrides: list[str] = field(default_factory=list)

    def mlflow_tags(self) -> dict[str, str]:
        if self.file is None:
            return {}
        return {TAG_CONFIG_FILE: self.file, TAG_CONFIG_FILE_DIGEST: self.file_digest or "",
                TAG_CONFIG_OVERRIDES: "\n".join(self.overrides)}


def file_digest(data: bytes) -> str:
    """The digest recorded for a config file: the first 16 hex digits of the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def config_path(file: str, root: Path | None = None) -> Path:
    """``file`` (relative to the project ``root``, default the project this package is in) as a path inside ``<root>/configs/``; anything else is a
    :class:`ConfigError` naming the file and the fix."""
    root = PROJECT_ROOT if root is None else root
    configs = (root / CONFIGS_DIR).resolve()
    rel = Path(file)
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(configs):
        raise ConfigError(
            f"config file '{file}': a deployment reads configs from the project's {CONFIGS_DIR}/ folder; "
            f"pass a path relative to the project such as {CONFIGS_DIR}/default.yaml"
        )
    if not path.is_file():
        known = sorted(p.relative_to(root.resolve()).as_posix() for p in configs.glob("*.yaml"))
        raise ConfigError(f"config file '{file}': not found in {configs}. Known: {', '.join(known) or 'none'}")
    return path


def resolve_config(cfg: Config | ConfigFile, root: Path | None = None) -> tuple[Config, ConfigSource]:
    """The flow parameter as a Config, and where it came from (a :class:`ConfigFile` is read now)."""
    if isinstance(cfg, Config):
        return cfg, ConfigSource()
    path = config_path(cfg.file, root)
    digest = file_digest(path.read_bytes())
    loaded = load_config(path, list(cfg.overrides))
    return loaded, ConfigSource(file=Path(cfg.file).as_posix(), file_digest=digest, overrides=list(cfg.overrides))


def config_markdown(cfg: Config, source: ConfigSource) -> str:
    """The Prefect artifact's text: the source file, its digest, the overrides and the resolved config."""
    lines = ["# Config of this run", ""]
    if source.file is None:
        lines.append("Passed inline as the flow's `cfg` parameter (no file).")
    else:
        lines += [f"- file: `{source.file}`", f"- file digest (sha256, 16 hex): `{source.file_digest}`"]
        lines.append("- overrides: " + (", ".join(f"`{o}`" for o in source.overrides) or "none"))
    lines += [f"- resolved config digest: `{cfg.digest()}`", "", "```yaml", dump_yaml(cfg).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def publish_config(cfg: Config, source: ConfigSource) -> UUID:
    """The Prefect artifact ``detoxflow-config-<name>`` in the current flow run (:func:`config_markdown`)."""
    return create_markdown_artifact(
        markdown=config_markdown(cfg, source),
        key=artifact_key("detoxflow-config", cfg.name),
        description="the config file, its digest, the overrides and the resolved config this run used",
    )


def record_config(cfg: Config, source: ConfigSource, run_id: str) -> None:
    """The config on the flow run: the Prefect artifact (:func:`publish_config`) and, on the MLflow run
    ``run_id`` (which already holds ``config.yaml`` and the resolved config's digest), the source file's tags."""
    publish_config(cfg, source)
    if source.file is not None:
        tracking.set_tags(source.mlflow_tags(), run_id=run_id)

"""Lineage: what a run or a model version was made from (the code, the models, the config, the data).

:func:`lineage_tags` is the one place the lineage tags are built: a pipeline run gets them through
:func:`run_tags` (plus the tags the MLflow UI shows), a registered version through
:func:`detoxflow.tracking.registry.register_model`. Data splits are logged as MLflow dataset inputs by
:func:`log_split`, which also tags the run with the split's digest so the registry can find it again
(:func:`split_digest_of_run`).
"""

from __future__ import annotations

import functools
import logging
import subprocess
import time
import warnings
from collections.abc import Sequence
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

import detoxflow
from detoxflow.config import Config
from detoxflow.paths import PROJECT_ROOT
from detoxflow.tracking.backend import (
    TAG_BASE_MODEL,
    TAG_CONFIG_DIGEST,
    TAG_CONFIG_NAME,
    TAG_GIT_DIRTY,
    TAG_GIT_SHA,
    TAG_REWARD_MODEL,
    TAG_VERSION,
    _client,
    run_id_or_active,
    set_tags,
)

log = logging.getLogger("detoxflow.tracking")  # the name users saw before the split


# ------------------------------------------------------------------------------------------ lineage tags


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit sha, dirty) of the checkout detoxflow runs from, or (None, None) outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30,
        )
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return sha.stdout.strip(), dirty
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def model_ids(cfg: Config) -> tuple[str, str]:
    """(base model id, reward model id) as recorded in tags: hub id or path, with ``@revision`` when pinned."""
    base = cfg.model.name_or_path + (f"@{cfg.model.revision}" if cfg.model.revision else "")
    if cfg.reward.kind == "hf_classifier":
        reward = f"{cfg.reward.model}" + (f"@{cfg.reward.revision}" if cfg.reward.revision else "")
    elif cfg.reward.kind == "callable":
        reward = f"callable:{cfg.reward.callable}"
    else:
        reward = cfg.reward.kind
    return base, reward


def lineage_tags(cfg: Config) -> dict[str, str]:
    """Config digest and name, detoxflow version, base and reward model ids, and the git sha when known: the
    tags a pipeline run and a registered version share."""
    base, reward = model_ids(cfg)
    tags = {
        TAG_CONFIG_DIGEST: cfg.digest(),
        TAG_CONFIG_NAME: cfg.name,
        TAG_VERSION: detoxflow.__version__,
        TAG_BASE_MODEL: base,
        TAG_REWARD_MODEL: reward,
    }
    sha, _ = git_state()
    if sha:
        tags[TAG_GIT_SHA] = sha
    return tags


def run_tags(cfg: Config) -> dict[str, str]:
    """Lineage tags of a pipeline run: :func:`lineage_tags`, plus the commit the MLflow UI shows and whether
    the checkout had uncommitted changes."""
    tags = lineage_tags(cfg)
    sha, dirty = git_state()
    if sha:
        tags[MLFLOW_GIT_COMMIT] = sha  # the MLflow UI shows this one
        if dirty is not None:
            tags[TAG_GIT_DIRTY] = str(dirty).lower()
    return tags


# ------------------------------------------------------------------------------------------ data splits


def _dataset_source(source: str, split_name: str) -> Any:
    """An MLflow dataset source for a ``data.source`` string: hub, local file/folder, URL or the shipped corpus."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if source.startswith("hf:"):
        return HuggingFaceDatasetSource(path=source[3:], split=split_name)
    if source == "embedded":
        # the corpus ships with the code, so its version is the code's version
        return CodeDatasetSource(tags={"detoxflow.source": "embedded", "split": split_name,
                                       TAG_VERSION: detoxflow.__version__})
    with warnings.catch_warnings():
        # a local path matches several equivalent resolvers; MLflow warns about the ambiguity
        warnings.simplefilter("ignore")
        try:
            return resolve_dataset_source(source)
        except MlflowException:
            return CodeDatasetSource(tags={"detoxflow.source": source, "split": split_name})


_DUPLICATE_KEY = ("duplicate key value violates unique constraint", "UNIQUE constraint failed", "Duplicate entry")


def _log_inputs(cli: MlflowClient, run_id: str, inputs: list[Any], attempts: int = 3) -> None:
    """``log_inputs``, retried when the store refuses a duplicate dataset row: two runs logging the same split at
    the same moment both find no dataset row and both insert it (seen on a PostgreSQL-backed server with eight
    concurrent gates); on the retry the row exists and is only linked to the run."""
    for attempt in range(attempts):
        try:
            cli.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as e:
            if attempt + 1 == attempts or not any(k in str(e) for k in _DUPLICATE_KEY):
                raise
            log.info("log_inputs raced another run on the same dataset; retrying (%s)", type(e).__name__)
            time.sleep(0.2 * (attempt + 1))


def _split_digest_tag(split: str) -> str:
    return f"detoxflow.data.{split}.digest"


def log_split(
    split_name: str,
    digest: str,
    source: str,
    ids: Sequence[str],
    context: str,
    run_id: str | None = None,
) -> None:
    """Record a data split as a run input (``mlflow.log_input`` lineage): name, digest, source, size, ids.

    ``digest`` is ``models.data.split_digest(records)``; ``context`` is e.g. ``training`` or ``evaluation``.
    The dataset entity carries the digest and schema; the ids themselves go into ``data/<split>.ids.json``, and
    run tags ``detoxflow.data.<split>.digest`` / ``.n`` make the split searchable."""
    import pandas as pd

    rid = run_id_or_active(run_id)
    cli = _client()
    df = pd.DataFrame({"id": [str(i) for i in ids]})
    dataset = mlflow.data.from_pandas(df, source=_dataset_source(source, split_name), name=split_name, digest=digest)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    _log_inputs(cli, rid, inputs)
    cli.log_dict(rid, {"split": split_name, "digest": digest, "source": source, "n": len(ids), "ids": list(map(str, ids))},
                 f"data/{split_name}.ids.json")
    set_tags({_split_digest_tag(split_name): digest, f"detoxflow.data.{split_name}.n": str(len(ids))}, rid)


def split_digest_of_run(run_id: str, split: str) -> str | None:
    """The digest :func:`log_split` recorded for ``split`` on the run or any of its ancestors (up to 5 levels)."""
    cli = _client()
    key = _split_digest_tag(split)
    rid: str | None = run_id
    for _ in range(5):
        if rid is None:
            return None
        run = cli.get_run(rid)
        if key in run.data.tags:
            return run.data.tags[key]
        rid = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    return None

"""Cache policies and persistent result storage for the stages that may be skipped on a rerun.

Only ``prepare_data`` and ``score_baseline`` are cached. Their keys combine

- the config sections the stage actually reads (``cfg.section_digest(...)``), so tuning PPO does not
  recompute the baseline but changing the generation settings does;
- the data digest (the split content, not its file name), so an edited data file invalidates the cache;
- the task's source code (``TASK_SOURCE``), so changing the task recomputes it.

Results are persisted as JSON under ``<work_dir>/cache/prefect-results`` — a folder, not Prefect's database —
so a rerun in a new process (and a new ephemeral Prefect API) still finds them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.context import TaskRunContext

from detoxflow.config import Config
from detoxflow.paths import work_dir

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=Task)

# Sections whose values change what the stage computes. The baseline also keys on the evaluation settings
# digest (prompt template, query truncation, generation, eval, reward, seed), so a change of, say,
# data.max_train_samples does not recompute it. `lora` is left out on purpose: a freshly initialised LoRA
# adapter has B = 0, so the policy before training is the base model whatever r is.
PREPARE_SECTIONS: tuple[str, ...] = ("data",)
BASELINE_SECTIONS: tuple[str, ...] = ("model",)


def results_dir(cfg: Config) -> Path:
    """Where cached stage results (and their cache records) live: inside the run's work dir."""
    path = work_dir(cfg.work_dir) / "cache" / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def data_fingerprint(cfg: Config) -> dict[str, str]:
    """Digests of the train and eval splits as the config selects them (caps and filters applied).

    Loading the splits is cheap next to any model work, and hashing the content (not the path or mtime)
    means a data change always invalidates while a touched-but-identical file does not.
    """
    from detoxflow.models.data import load_split, split_digest

    return {
        "train_digest": split_digest(load_split(cfg.data, cfg.data.train_split)),
        "eval_digest": split_digest(load_split(cfg.data, cfg.data.eval_split)),
    }


def model_fingerprint(name_or_path: str) -> str:
    """Identity of the base model weights when they live in a local folder (name, size, mtime of each file).

    A hub id is identified by the config itself (name + revision); an embedded model by its build hash
    (corpus, build code, settings: cheap to compute, no build needed). A local folder can be overwritten in
    place, so its files are part of the key.
    """
    from detoxflow.models.bootstrap import EMBEDDED_PREFIX, SETTINGS, build_hash

    if name_or_path.startswith(EMBEDDED_PREFIX):
        arch = name_or_path[len(EMBEDDED_PREFIX):]
        return f"{name_or_path}-{build_hash(SETTINGS[arch])}" if arch in SETTINGS else name_or_path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path
    entries = sorted(
        (str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime))
        for p in path.rglob("*")
        if p.is_file()
    )
    return _hash(str(path.resolve()), entries)


def prepare_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of ``prepare_data``: the data section and the content of the splits it selects."""
    cfg: Config = parameters["cfg"]
    return "prepare-" + _hash(cfg.section_digest(*PREPARE_SECTIONS), data_fingerprint(cfg))


def baseline_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of ``score_baseline``: the model section, the evaluation settings, the eval split digest and
    the base weights."""
    from detoxflow.models.evaluate import settings_digest

    cfg: Config = parameters["cfg"]
    data: dict[str, Any] = parameters["data"]
    return "baseline-" + _hash(
        cfg.section_digest(*BASELINE_SECTIONS), settings_digest(cfg), data["eval_digest"],
        model_fingerprint(cfg.model.name_or_path),
    )


PREPARE_POLICY: CachePolicy = CacheKeyFnPolicy(cache_key_fn=prepare_key) + TASK_SOURCE
BASELINE_POLICY: CachePolicy = CacheKeyFnPolicy(cache_key_fn=baseline_key) + TASK_SOURCE


def with_cache(task: T, cfg: Config, policy: CachePolicy) -> T:
    """The task bound to this config's persistent result storage, or uncached when caching is off.

    Storage is chosen per run (it lives under ``cfg.work_dir``), hence ``with_options`` at call time rather
    than a fixed path in the decorator.
    """
    if not cfg.orchestration.cache:
        return task.with_options(cache_policy=NO_CACHE, persist_result=False)
    return task.with_options(
        cache_policy=policy,
        persist_result=True,
        result_storage=results_dir(cfg),
        result_serializer="json",
    )

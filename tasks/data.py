"""``prepare_data``: load the train and held-out splits, digest them, write prompts and eval records to files.

Downstream stages receive the small dict this task returns (digests, counts, file paths), never the records
themselves: Prefect passes it between tasks and caches it as JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from detoxflow import atomic
from detoxflow.config import Config
from detoxflow.models.data import Record, build_prompt, load_split, split_digest
from detoxflow.paths import work_dir

logger = logging.getLogger(__name__)


def write_records(path: Path, records: list[Record]) -> None:
    atomic.write_text(path, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records))


def read_records(path: str | Path) -> list[Record]:
    """The eval records ``prepare_data`` wrote, in evaluation order."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: prepared eval records are missing (was the work dir cleaned?). Rerun the pipeline; "
            "prepare_data rewrites them when its cache entry points at a missing file."
        )
    with p.open(encoding="utf-8") as fh:
        return [Record(**json.loads(line)) for line in fh if line.strip()]


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """``(id, prompt)`` pairs of the train split, as ``prepare_data`` templated them."""
    with Path(path).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(row["id"], row["prompt"]) for row in rows]


def prepared_files_exist(data: dict[str, Any]) -> bool:
    """A cached result is only usable while the files it points at still exist."""
    return all(Path(data[k]).is_file() for k in ("train_prompts", "eval_records"))


def log_lineage(data: dict[str, Any], run_id: str | None) -> None:
    """Both splits as MLflow dataset inputs (digest, source, ids) of the run ``run_id``."""
    from detoxflow import tracking

    train_ids = [i for i, _ in read_prompts(data["train_prompts"])]
    eval_ids = [r.id for r in read_records(data["eval_records"])]
    tracking.log_split(data["train_split"], data["train_digest"], data["source"], train_ids, "training", run_id=run_id)
    tracking.log_split(data["eval_split"], data["eval_digest"], data["source"], eval_ids, "evaluation", run_id=run_id)


# Uncached as declared: the cache (PREPARE_POLICY) is bound per run by with_cache(), with result storage under
# cfg.work_dir; a default-storage cache would be shared by every work dir and hand one run the files of another.
@task(name="prepare_data", cache_policy=NO_CACHE, persist_result=False)
def prepare_data(cfg: Config) -> dict[str, Any]:
    """Load both splits, check they are usable and disjoint, write prompts and eval records.

    Returns ``{"train_digest", "eval_digest", "n_train", "n_eval", "train_prompts", "eval_records", "source",
    "train_split", "eval_split"}`` (paths are absolute, under ``<work_dir>/data/<digests>/``): the templated
    train prompts as ``{"id", "prompt"}`` lines (what training will see), the eval records in evaluation order.
    """
    log = get_run_logger()
    data_cfg = cfg.data
    train = load_split(data_cfg, data_cfg.train_split)
    evals = load_split(data_cfg, data_cfg.eval_split)
    for split, recs in ((data_cfg.train_split, train), (data_cfg.eval_split, evals)):
        if not recs:
            raise ValueError(
                f"data.source={data_cfg.source!r}: split '{split}' has no records after filtering "
                f"(min_dialogue_chars={data_cfg.min_dialogue_chars}, "
                f"max_dialogue_chars={data_cfg.max_dialogue_chars}). "
                "Relax the filters or point data.source at a dataset with this split."
            )
    # A held-out split is only held out if no training dialogue appears in it.
    seen = {r.dialogue for r in train}
    leaked = [r.id for r in evals if r.dialogue in seen]
    if leaked:
        raise ValueError(
            f"data.source={data_cfg.source!r}: {len(leaked)} of {len(evals)} '{data_cfg.eval_split}' dialogues also "
            f"appear in '{data_cfg.train_split}' (e.g. {leaked[:3]}). Use disjoint splits for data.train_split and "
            "data.eval_split."
        )
    train_digest, eval_digest = split_digest(train), split_digest(evals)
    out = work_dir(cfg.work_dir) / "data" / f"{train_digest}-{eval_digest}"
    prompts = "".join(
        json.dumps({"id": r.id, "prompt": build_prompt(data_cfg.prompt_template, r)}, ensure_ascii=False) + "\n"
        for r in train
    )
    atomic.write_text(out / "train_prompts.jsonl", prompts)
    write_records(out / "eval_records.jsonl", evals)
    log.info(
        "prepared %d train / %d eval records from %s (train %s, eval %s)",
        len(train), len(evals), data_cfg.source, train_digest, eval_digest,
    )
    return {
        "source": data_cfg.source,
        "train_split": data_cfg.train_split,
        "eval_split": data_cfg.eval_split,
        "train_digest": train_digest,
        "eval_digest": eval_digest,
        "n_train": len(train),
        "n_eval": len(evals),
        "train_prompts": str(out / "train_prompts.jsonl"),
        "eval_records": str(out / "eval_records.jsonl"),
    }

"""The DialogSum evaluation of docs/results.md: its data path, as the pipeline's prepare stage runs it.

The evaluation there reads ``../shared/data/dialogsum/dev.jsonl`` with ``data.eval_split=train
data.train_split=test data.max_eval_samples=200``: the file's carved ``train`` part (about 400 dialogues) as the
held-out prompts, since nothing trains on DialogSum in that run, and the carved ``test`` part as the (unused)
training split, because prepare refuses overlapping splits, and ``dev`` (the whole file) overlaps every carve.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from detoxflow.config import load_config
from detoxflow.models.data import load_split

ROOT = Path(__file__).resolve().parent.parent
DIALOGSUM_DEV = ROOT.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"

pytestmark = [
    pytest.mark.slow,  # the Prefect test API's start-up; the tests themselves take seconds
    pytest.mark.skipif(not DIALOGSUM_DEV.is_file(), reason="DialogSum dev file not present"),
    pytest.mark.usefixtures("prefect_harness"),
]


def _prepare(cfg):
    """``prepare_data``'s body inside a flow run (its logger needs one), without the Prefect task machinery.

    Before fb1dda2 the task itself carried the prepare cache policy with Prefect's default result storage, so a
    direct call returned another pytest session's paths (deleted files) in a full-suite run; this test is about
    the data path, not about Prefect's task results."""
    from prefect import flow

    from detoxflow.tasks.data import prepare_data

    @flow(name="test-prepare-dialogsum")
    def run(c):
        return prepare_data.fn(c)

    return run(cfg)


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "default.yaml", [
        f"work_dir={tmp_path}", f"data.source={DIALOGSUM_DEV}", "data.max_eval_samples=200", *overrides,
    ])


def test_dialogsum_prompts_prepare_as_in_the_results_evaluation(tmp_path):
    from detoxflow.tasks.data import read_prompts, read_records

    cfg = _cfg(tmp_path, "data.eval_split=train", "data.train_split=test")
    data = _prepare(cfg)
    evals = read_records(data["eval_records"])
    assert data["n_eval"] == len(evals) == 200  # capped by data.max_eval_samples
    assert [r.id for r in evals] == [r.id for r in load_split(cfg.data, "train")]  # the carve's first 200, in order
    assert all(r.id.startswith("dev_") and r.dialogue and r.summary for r in evals)
    train_ids = {i for i, _ in read_prompts(data["train_prompts"])}
    assert train_ids and not train_ids & {r.id for r in evals}
    assert data["eval_digest"] == _prepare(cfg)["eval_digest"]  # the same prompts on every run


def test_the_whole_dev_file_cannot_be_the_eval_split_next_to_one_of_its_carves(tmp_path):
    with pytest.raises(ValueError, match="Use disjoint splits"):
        _prepare(_cfg(tmp_path, "data.eval_split=dev", "data.train_split=train"))

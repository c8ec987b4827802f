"""The shipped corpus (deterministic, DialogSum-shaped, toxic only where designed) and the data module."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detoxflow.config import DataConfig
from detoxflow.models.data import DataError, Record, available_splits, build_prompt, load_split, split_digest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DIALOGSUM_DEV = PROJECT_ROOT.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"
DATA = PROJECT_ROOT / "data"
SPLITS = ("train", "validation", "test")
TURN = re.compile(r"^#Person[12]#: \S")


def _generator():
    spec = importlib.util.spec_from_file_location("generate_corpus", DATA / "generate_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"id": f"r{i}", "dialogue": f"#Person1#: Hello number {i}.\n#Person2#: Hi there, friend {i}.", "summary": f"They greet {i}.",
     "topic": "greeting"}
    for i in range(6)
]


# ------------------------------------------------------------------------------------------ corpus
def test_generator_is_deterministic_and_committed_data_is_its_output(tmp_path):
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(DATA / "generate_corpus.py"), "--out", str(tmp_path / out)], check=True,
                       capture_output=True)
    for split in SPLITS:
        first = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert first == (tmp_path / "b" / f"{split}.jsonl").read_bytes(), f"{split}: two runs differ"
        assert first == (DATA / f"{split}.jsonl").read_bytes(), (
            f"data/{split}.jsonl is stale: run `python data/generate_corpus.py` and commit the result")


def test_corpus_has_dialogsum_shape_sizes_and_variety():
    seen_dialogues: set[str] = set()
    sizes = {}
    for split in SPLITS:
        rows = _rows(DATA / f"{split}.jsonl")
        sizes[split] = len(rows)
        assert all(list(r) == ["id", "dialogue", "summary", "topic"] for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            lines = r["dialogue"].split("\n")
            assert len(lines) >= 3 and all(TURN.match(line) for line in lines), r["id"]
            assert r["dialogue"] not in seen_dialogues, f"{r['id']} repeats a dialogue of another record"
            seen_dialogues.add(r["dialogue"])
        assert len({r["topic"] for r in rows}) >= 20, f"{split}: too few topics"
    assert sizes == {"train": 4000, "validation": 200, "test": 200}
    train = _rows(DATA / "train.jsonl")
    assert len({r["summary"] for r in train}) > 3000, "summaries should be varied, not a handful of templates"
    assert sum("#Person" in r["summary"] for r in train) > 0.5 * len(train)
    assert sum("#Person" not in r["summary"] for r in train) > 0.1 * len(train), "some summaries should use names"


def test_toxicity_only_in_train_and_removable():
    """Rude train summaries are flagged; their polite twins (insults removed) and all gold summaries are not."""
    from profanity_check import predict_prob

    gen = _generator()
    train = _rows(DATA / "train.jsonl")
    p_train = predict_prob([r["summary"] for r in train])
    share = float((p_train > 0.5).mean())
    assert 0.15 < share < 0.3, f"train toxic share {share:.3f}, designed ~0.21 (30% heated x 70% rude)"
    for split in ("validation", "test"):
        p = predict_prob([r["summary"] for r in _rows(DATA / f"{split}.jsonl")])
        assert (p > 0.5).sum() == 0, f"{split} gold summaries must be polite"

    rude = [r["summary"] for r in train if r["summary"].startswith(tuple(gen.RUDE_OPENERS))]
    assert len(rude) > 500
    adjectives = "|".join(gen.RUDE_ADJECTIVES)
    polite = [re.sub(rf"\b({adjectives}) ", "", s.split(" ", 3)[3]) for s in rude]
    assert float(predict_prob(polite).max()) < 0.5, "removing the insults must leave a polite summary"
    # Same content: the rude twin is only a few words longer.
    assert max(len(r.split()) - len(p.split()) for r, p in zip(rude, polite)) <= 4


# ------------------------------------------------------------------------------------------ sources
def test_embedded_splits_and_caps():
    cfg = DataConfig(source="embedded", max_train_samples=100, max_eval_samples=7)
    assert available_splits(cfg) == ["train", "validation", "test"]
    assert len(load_split(cfg, "train")) == 100
    test = load_split(cfg, "test")
    assert len(test) == 7 and isinstance(test[0], Record)
    full = load_split(cfg, "test", apply_caps=False)
    assert len(full) == 200 and full[:7] == test, "caps keep the first records in file order"
    assert test[0].id == "test_0" and test[0].dialogue.startswith("#Person")


def test_length_filter():
    full = load_split(DataConfig(), "validation", apply_caps=False)
    limit = sorted(len(r.dialogue) for r in full)[len(full) // 2]
    short = load_split(DataConfig(max_dialogue_chars=limit), "validation", apply_caps=False)
    assert 0 < len(short) < len(full) and all(len(r.dialogue) <= limit for r in short)
    with pytest.raises(DataError, match="max_dialogue_chars"):
        load_split(DataConfig(min_dialogue_chars=99_998, max_dialogue_chars=99_999), "validation")


def test_unknown_split_names_the_available_ones():
    with pytest.raises(DataError) as err:
        load_split(DataConfig(), "dev")
    assert "train, validation, test" in str(err.value) and "'dev'" in str(err.value)


@pytest.mark.skipif(not DIALOGSUM_DEV.is_file(), reason="DialogSum dev file not present")
def test_dialogsum_dev_file_with_fname_ids_and_carved_splits(tmp_path):
    cfg = DataConfig(source=str(DIALOGSUM_DEV))
    assert available_splits(cfg) == ["dev", "train", "validation", "test"]
    dev = load_split(cfg, "dev", apply_caps=False)
    assert len(dev) == 500 and dev[0].id == "dev_0" and dev[0].topic
    parts = {s: load_split(cfg, s, apply_caps=False) for s in ("train", "validation", "test")}
    ids = {s: {r.id for r in recs} for s, recs in parts.items()}
    assert set().union(*ids.values()) == {r.id for r in dev}, "the carved splits cover the file"
    assert sum(len(v) for v in ids.values()) == 500, "the carved splits do not overlap"
    assert 350 < len(ids["train"]) < 450 and 25 < len(ids["test"]) < 75
    # The carve depends on ids, not on file order.
    reversed_copy = tmp_path / "dialogsum.jsonl"
    reversed_copy.write_text("".join(reversed(DIALOGSUM_DEV.read_text().splitlines(keepends=True))))
    assert {r.id for r in load_split(DataConfig(source=str(reversed_copy)), "test", apply_caps=False)} == ids["test"]


def test_single_file_named_like_a_split_is_only_that_split(tmp_path):
    cfg = DataConfig(source=str(_write_jsonl(tmp_path / "train.jsonl", ROWS)))
    assert available_splits(cfg) == ["train"]
    assert len(load_split(cfg, "train")) == 6
    with pytest.raises(DataError, match="available splits: train"):
        load_split(cfg, "test")


def test_csv_source_with_multiline_dialogues_and_custom_fields(tmp_path):
    path = tmp_path / "mine.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "conversation", "gist"])
        for r in ROWS:
            w.writerow([r["id"], r["dialogue"], r["summary"]])
    cfg = DataConfig(source=str(path), id_field="key", dialogue_field="conversation", summary_field="gist")
    recs = load_split(cfg, "mine")
    assert [r.id for r in recs] == [r["id"] for r in ROWS]
    assert recs[1].dialogue == ROWS[1]["dialogue"] and recs[1].topic == ""

    rows = [["key", "conversation", "gist"], ["a", "#Person1#: Hi\n#Person2#: Hello", "Greeting."], ["b", "#Person1#: Yo", ""]]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    # Row "b" starts on line 4: the quoted dialogue of row "a" spans lines 2-3.
    with pytest.raises(DataError, match=r"mine\.csv, line 4: field 'gist' is empty"):
        load_split(cfg, "mine")


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, id=i) for i, r in enumerate(ROWS)]  # integer ids are fine
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    recs = load_split(DataConfig(source=str(tmp_path / "test.parquet")), "test", apply_caps=False)
    assert [r.id for r in recs] == [str(i) for i in range(6)] and recs[0].topic == "greeting"

    bad = [dict(r) for r in ROWS]
    bad[2]["summary"] = None
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet, row 3: field 'summary' is missing"):
        load_split(DataConfig(source=str(tmp_path / "bad.parquet")), "bad")


def test_folder_source(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    with (tmp_path / "dev.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS[4:])
    (tmp_path / "notes.txt").write_text("ignored")
    cfg = DataConfig(source=str(tmp_path))
    assert available_splits(cfg) == ["train", "dev"]
    assert [r.id for r in load_split(cfg, "dev")] == ["r4", "r5"]
    assert len(load_split(cfg, "train")) == 4
    _write_jsonl(tmp_path / "dev.jsonl", ROWS[4:])
    with pytest.raises(DataError, match="both dev.csv and dev.jsonl"):
        load_split(cfg, "dev")


def test_hf_source_through_datasets(tmp_path, monkeypatch):
    """`hf:` goes through datasets.load_dataset; a local dataset folder exercises it without the hub."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", ROWS[:4])
    _write_jsonl(folder / "test.jsonl", ROWS[4:])
    cfg = DataConfig(source=f"hf:{folder}")
    assert available_splits(cfg) == ["train", "test"]
    assert [r.id for r in load_split(cfg, "test")] == ["r4", "r5"]
    with pytest.raises(DataError, match="available splits: train, test"):
        load_split(cfg, "validation")
    with pytest.raises(DataError, match="point data.source at a local file"):
        load_split(DataConfig(source=f"hf:{tmp_path}/missing-dataset"), "train")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"summary": None}, "field 'summary' is missing"),
        ({"dialogue": "   "}, "field 'dialogue' is empty"),
        ({"dialogue": 42}, "field 'dialogue' must be a string"),
        ({"id": "r0"}, "id 'r0' repeats"),
    ],
)
def test_bad_rows_name_file_line_field_and_fix(tmp_path, change, message):
    rows = [dict(r) for r in ROWS]
    rows[2].update(change)
    if change.get("summary", "") is None:
        del rows[2]["summary"]
    path = _write_jsonl(tmp_path / "dialogues.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_split(DataConfig(source=str(path)), "dialogues")
    text = str(err.value)
    assert f"{path}, line 3" in text and message in text
    assert any(w in text for w in ("fix", "fill", "add", "unique")), "the message should say what to do"


def test_invalid_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"x\.jsonl, line 3: not valid JSON"):
        load_split(DataConfig(source=str(path)), "x")


def test_missing_source():
    with pytest.raises(DataError, match="no such file or folder"):
        load_split(DataConfig(source="/nonexistent/dialogues.jsonl"), "train")


# ------------------------------------------------------------------------------------------ digest, prompt
def test_digest_tracks_content_and_order():
    recs = load_split(DataConfig(), "test", apply_caps=False)[:20]
    digest = split_digest(recs)
    assert len(digest) == 16 and digest == split_digest(list(recs))
    changed = list(recs)
    changed[5] = Record(recs[5].id, recs[5].dialogue, recs[5].summary + " Then they leave.", recs[5].topic)
    assert split_digest(changed) != digest
    assert split_digest(list(reversed(recs))) != digest, "the digest is order-dependent (evaluation order)"
    moved = [Record("a", "bc", "d"), Record("e", "f", "g")]
    assert split_digest(moved) != split_digest([Record("a", "b", "cd"), Record("e", "f", "g")])


def test_build_prompt():
    rec = Record("x", "#Person1#: Hi {there}", "Greeting.")
    assert build_prompt("Summarize:\n{dialogue}\nSummary:", rec) == "Summarize:\n#Person1#: Hi {there}\nSummary:"
    assert build_prompt(DataConfig().prompt_template, rec).endswith("Summary:")
    with pytest.raises(DataError, match="placeholder"):
        build_prompt("Summarize:", rec)

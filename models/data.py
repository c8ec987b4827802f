"""Prompt datasets: the shipped demo corpus, local jsonl/csv/parquet files or folders, and the Hugging Face hub.

Sources (``DataConfig.source``):

* ``embedded`` — the corpus shipped in ``data/`` (``detoxflow.paths.data_dir()``): train, validation, test.
* a folder holding ``<split>.jsonl`` / ``<split>.csv`` / ``<split>.parquet`` files: each file is a split.
* a single ``.jsonl`` / ``.csv`` / ``.parquet`` file: its stem is its split name (``dev.jsonl`` is split
  ``dev``). If its stem is not itself ``train``/``validation``/``test``, those three splits are also
  available, carved from the file by a hash of each record id (80/10/10): the same record always lands in the
  same split whatever the file order, and the three never overlap.
* ``hf:<dataset id>`` — ``datasets.load_dataset(<id>, split=...)`` (needs the hub or its local cache).

Field names come from the config (``id_field`` etc.). DialogSum's own files name the id ``fname``; when the
configured id field is absent, ``fname`` is used. ``topic`` is optional (empty when the column is absent).
Every other problem in a row raises :class:`DataError` naming the file, the row, the field and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detoxflow.config import DataConfig
from detoxflow.paths import data_dir

logger = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".csv", ".parquet")
CARVED_SPLITS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
ID_FALLBACKS = ("fname",)  # DialogSum's original files


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file, row, field and what to do."""


@dataclass(frozen=True)
class Record:
    """One dialogue with its reference summary."""

    id: str
    dialogue: str
    summary: str
    topic: str = ""


# ------------------------------------------------------------------------------------------ public API
def available_splits(cfg: DataConfig) -> list[str]:
    """Split names the configured source offers, in a stable order (train, validation, test first)."""
    kind, location = _resolve_source(cfg.source)
    if kind == "hf":
        return _order_splits(_hf_split_names(location))
    if kind == "file":
        stem = location.stem
        carved = [] if stem in CARVED_SPLITS else list(CARVED_SPLITS)
        return [stem, *carved]
    return _order_splits(_folder_splits(location))


def load_split(cfg: DataConfig, split: str, apply_caps: bool = True) -> list[Record]:
    """The records of one split, validated, length-filtered and (with ``apply_caps``) capped.

    The cap is ``max_train_samples`` for ``cfg.train_split`` and ``max_eval_samples`` for every other split;
    capping keeps the first records, so the evaluation order (and the digest) is stable.
    """
    kind, location = _resolve_source(cfg.source)
    if kind == "hf":
        records = _load_hf(cfg, location, split)
    elif kind == "file":
        records = _load_from_file(cfg, location, split)
    else:
        splits = _folder_splits(location)
        if split not in splits:
            raise _unknown_split(split, cfg.source, _order_splits(splits))
        records = _read_file(cfg, splits[split])
    records = _filter_length(records, cfg, split)
    if apply_caps:
        cap = cfg.max_train_samples if split == cfg.train_split else cfg.max_eval_samples
        if cap is not None and len(records) > cap:
            records = records[:cap]
    logger.debug("loaded %d records of split %r from %s", len(records), split, cfg.source)
    return records


def split_digest(records: Iterable[Record]) -> str:
    """sha256 (16 hex chars) of ids, dialogues and summaries in order: the order is the evaluation order."""
    h = hashlib.sha256()
    for r in records:
        # Length-prefixed fields, so that moving text between fields or records changes the digest.
        for part in (r.id, r.dialogue, r.summary):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:16]


def build_prompt(template: str, record: Record) -> str:
    """The query text for one record: ``template`` with ``{dialogue}`` replaced (other braces left alone)."""
    if "{dialogue}" not in template:
        raise DataError(f"prompt template {template!r} has no {{dialogue}} placeholder; add it, e.g. 'Summarize:\\n{{dialogue}}'")
    return template.replace("{dialogue}", record.dialogue)


# ------------------------------------------------------------------------------------------ sources
def _resolve_source(source: str) -> tuple[str, Any]:
    """('hf', id) | ('file', Path) | ('folder', Path)."""
    if source.startswith("hf:"):
        dataset_id = source[3:].strip()
        if not dataset_id:
            raise DataError("data.source 'hf:' has no dataset id; write e.g. hf:knkarthick/dialogsum")
        return "hf", dataset_id
    path = data_dir() if source == "embedded" else Path(source).expanduser()
    if source == "embedded" and not path.is_dir():
        raise DataError(f"embedded corpus folder {path} not found; regenerate it with `python data/generate_corpus.py` "
                        "or point DETOXFLOW_DATA_DIR at a folder with train/validation/test.jsonl")
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.suffix not in EXTENSIONS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(EXTENSIONS)}")
        return "file", path
    raise DataError(f"data.source '{source}': no such file or folder. Use 'embedded', a .jsonl/.csv/.parquet file, "
                    "a folder of <split>.<ext> files, or hf:<dataset id>")


def _folder_splits(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in EXTENSIONS:
            if path.stem in found:
                raise DataError(f"{folder}: split '{path.stem}' exists as both {found[path.stem].name} and {path.name}; "
                                "keep one file per split")
            found[path.stem] = path
    if not found:
        raise DataError(f"{folder}: no split files found; add <split>.jsonl, <split>.csv or <split>.parquet files")
    return found


def _order_splits(names: Iterable[str]) -> list[str]:
    preferred = [s for s in CARVED_SPLITS if s in names]
    return preferred + sorted(set(names) - set(preferred))


def _unknown_split(split: str, source: str, available: list[str]) -> DataError:
    return DataError(f"split '{split}' not found in {source}; available splits: {', '.join(available)}. "
                     "Set data.train_split / data.eval_split to one of them")


def _load_from_file(cfg: DataConfig, path: Path, split: str) -> list[Record]:
    stem = path.stem
    if split == stem:
        return _read_file(cfg, path)
    if split in CARVED_SPLITS and stem not in CARVED_SPLITS:
        low, high = CARVED_SPLITS[split]
        records = [r for r in _read_file(cfg, path) if low <= _bucket(r.id) < high]
        if not records:
            raise DataError(f"{path}: the carved split '{split}' is empty (the file is too small for an 80/10/10 split); "
                            "use a bigger file or a folder with one file per split")
        return records
    raise _unknown_split(split, str(path), available_splits(cfg))


def _bucket(record_id: str) -> int:
    """A stable bucket in [0, 100) from the record id (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") % 100


# ------------------------------------------------------------------------------------------ readers
def _read_file(cfg: DataConfig, path: Path) -> list[Record]:
    rows = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[path.suffix](path)
    records = _to_records(cfg, rows, str(path))
    if not records:
        raise DataError(f"{path}: the file holds no records; add rows with {cfg.dialogue_field} and {cfg.summary_field}")
    return records


def _not_utf8(path: Path, line_no: int, raw: bytes, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}, line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                     "save the file as UTF-8")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, line_no, raw, e) from None
            if not line.strip():
                continue
            try:
                yield f"line {line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg}); write one JSON object per line") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):  # name the line of a byte that is not UTF-8 before parsing
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, line_no, raw, e) from None
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        for row in reader:
            # A quoted dialogue spans several physical lines; report the line where the row starts.
            yield f"line {start}", {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot read the parquet file ({e}); check that it is a valid parquet file") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"row {i}", row


def _to_records(cfg: DataConfig, rows: Iterable[tuple[str, Any]], origin: str) -> list[Record]:
    records: list[Record] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        rec = _to_record(cfg, row, f"{origin}, {where}")
        if rec.id in seen:
            raise DataError(f"{origin}, {where}: id '{rec.id}' repeats the id of {seen[rec.id]}; ids must be unique "
                            f"(field '{cfg.id_field}')")
        seen[rec.id] = where
        records.append(rec)
    return records


def _to_record(cfg: DataConfig, row: Any, where: str) -> Record:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields {cfg.id_field}, {cfg.dialogue_field}, "
                        f"{cfg.summary_field}; got {type(row).__name__}")
    id_field = cfg.id_field
    if id_field not in row:
        id_field = next((f for f in ID_FALLBACKS if f in row), id_field)
    rec_id = row.get(id_field)
    if isinstance(rec_id, int) and not isinstance(rec_id, bool):
        rec_id = str(rec_id)  # numeric ids (parquet, hub) are fine as ids
    return Record(
        id=_require_text(rec_id, id_field, where, "data.id_field"),
        dialogue=_require_text(row.get(cfg.dialogue_field), cfg.dialogue_field, where, "data.dialogue_field"),
        summary=_require_text(row.get(cfg.summary_field), cfg.summary_field, where, "data.summary_field"),
        topic=_optional_text(row.get(cfg.topic_field), cfg.topic_field, where),
    )


def _require_text(value: Any, field: str, where: str, setting: str) -> str:
    if value is None:
        raise DataError(f"{where}: field '{field}' is missing; add it to the row, or set {setting} to the column that holds it")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__} {value!r:.40}; fix the row")
    if not value.strip():
        raise DataError(f"{where}: field '{field}' is empty; fill it in or remove the row")
    return value


def _optional_text(value: Any, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__} {value!r:.40}; fix the row")
    return value


def _filter_length(records: list[Record], cfg: DataConfig, split: str) -> list[Record]:
    kept = [r for r in records if cfg.min_dialogue_chars <= len(r.dialogue) <= cfg.max_dialogue_chars]
    if records and not kept:
        raise DataError(f"split '{split}': no dialogue is between data.min_dialogue_chars={cfg.min_dialogue_chars} and "
                        f"data.max_dialogue_chars={cfg.max_dialogue_chars} characters; widen the range")
    if len(kept) < len(records):
        logger.info("split %r: kept %d of %d dialogues within [%d, %d] characters", split, len(kept), len(records),
                    cfg.min_dialogue_chars, cfg.max_dialogue_chars)
    return kept


# ------------------------------------------------------------------------------------------ hub
def _hf_split_names(dataset_id: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(dataset_id))
    except Exception as e:  # network, auth and missing-dataset errors all end up here
        raise DataError(f"hf:{dataset_id}: cannot list the dataset's splits ({type(e).__name__}: {e}). Check the id and "
                        "network access to the Hugging Face hub, or download it and point data.source at a local file") from None


def _load_hf(cfg: DataConfig, dataset_id: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise _unknown_split(split, f"hf:{dataset_id}", available_splits(cfg)) from None
        raise DataError(f"hf:{dataset_id}: cannot load split '{split}' ({e})") from None
    except Exception as e:
        raise DataError(f"hf:{dataset_id}: cannot load split '{split}' ({type(e).__name__}: {e}). Check the id and network "
                        "access to the Hugging Face hub, or download it and point data.source at a local file") from None
    rows = ((f"row {i}", row) for i, row in enumerate(ds, start=1))
    return _to_records(cfg, rows, f"hf:{dataset_id} split '{split}'")

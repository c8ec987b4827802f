"""Preflight: the checks a command makes before it writes anything or imports torch, Prefect or MLflow.

The config file is not empty; the model is a local folder, a well-formed hub id or ``embedded:*``; the data
source exists, has a supported format and its first rows decode; the reward is resolvable (its module is found,
not imported); an http(s) tracking server answers within a few seconds; a registry model URI has a store to be
read from. A failed check raises :class:`~detoxflow.errors.InputError` (exit 2) or
:class:`~detoxflow.errors.EnvironmentFault` (exit 3) with one line naming the item and the fix. Standard library,
``detoxflow.config``, ``paths``, ``locks`` and ``net`` only, so a failure comes within a second or two.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import re
import threading
from pathlib import Path

import yaml

from detoxflow import net
from detoxflow.config import EMBEDDED_MODELS, Config, DataConfig, RewardConfig
from detoxflow.errors import EnvironmentFault, InputError
from detoxflow.locks import sqlite_path
from detoxflow.paths import data_dir, find_home, tracking_uri

EXTENSIONS = (".jsonl", ".csv", ".parquet")  # as detoxflow.models.data (not imported: keep this module light)
HEAD_LINES = 1000  # rows of each data file decoded before anything starts
HEAD_BYTES = 4 << 20
SERVER_TIMEOUT_S = 4.0
HUB_TIMEOUT_S = 2.0  # a hub that does not answer in this long counts as unreachable (the check ends within it)
_hub_probe: dict[str, str | None] = {}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_REGISTRY_URI = ("models:/", "runs:/")


def check_config_file(path: Path | None) -> None:
    """An empty config file (nothing but blanks or comments) is refused: it would silently run every default."""
    if path is None or not path.is_file():
        return  # load_config names a missing file
    try:
        empty = yaml.safe_load(path.read_text(encoding="utf-8")) is None
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # load_config says what is wrong with it
    if empty:
        raise InputError(f"{path}: the config file is empty, so every setting would be a default. Write the sections "
                         "to use (see configs/default.yaml), or pass --config configs/default.yaml")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def in_hub_cache(repo_id: str, kind: str = "model") -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (``kind``: model or dataset)."""
    snapshots = _hub_cache() / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (``HF_HUB_OFFLINE``, no answer within :data:`HUB_TIMEOUT_S`), or None
    when it answers; asked once per process."""
    if "reason" not in _hub_probe:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            _hub_probe["reason"] = "HF_HUB_OFFLINE is set"
        else:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            seen: list[net.Response] = []
            # a thread, so that a slow DNS lookup (not covered by the socket timeout) cannot hold the command
            probe = threading.Thread(target=lambda: seen.append(net.request(f"{endpoint}/api/models?limit=1",
                                                                           timeout=HUB_TIMEOUT_S)), daemon=True)
            probe.start()
            probe.join(HUB_TIMEOUT_S)
            if not seen:
                _hub_probe["reason"] = f"{endpoint} did not answer within {HUB_TIMEOUT_S:.0f} s"
            else:
                _hub_probe["reason"] = f"{endpoint}: {seen[0].reason}" if seen[0].status == 0 else None
    return _hub_probe["reason"]


def check_hub_reachable(field: str, repo_id: str, kind: str = "model") -> None:
    """A hub id must be in the local cache or the hub must answer: with neither, one line saying to pass a local
    directory (instead of minutes of retries and tracebacks from the loaders)."""
    if in_hub_cache(repo_id, kind):
        return
    why = hub_unreachable()
    if why is not None:
        what = "a local folder that save_pretrained wrote" if kind == "model" else "a local data file or folder"
        raise InputError(f"{field} '{repo_id}' is a hub id, but the hub is not reachable ({why}) and it is not in "
                         f"the local cache {_hub_cache()}: pass {what} instead, or download it where there is internet")


def check_model_name(field: str, name: str) -> None:
    """``name`` is an embedded model, an existing local folder or a well-formed hub id that is cached or can be
    downloaded."""
    if name in EMBEDDED_MODELS:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{field} '{name}' is a file; give the folder save_pretrained wrote, a hub id or embedded:t5")
        return
    if _looks_like_path(name) or not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise InputError(f"{field} '{name}': no such folder, and not a hub id (owner/name). Give a local "
                         f"save_pretrained folder, a hub id such as google/flan-t5-small, or one of {', '.join(EMBEDDED_MODELS)}")
    check_hub_reachable(field, name)


def _check_jsonl(path: Path) -> None:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no > HEAD_LINES:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}, line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {line_no}: not valid JSON ({e.msg}); write one JSON object "
                                     "per line") from None


def _check_csv(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        line_no = head.count(b"\n", 0, e.start) + 1
        column = e.start - (head.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(f"{path}, line {line_no}: not UTF-8 text (byte 0x{head[e.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _check_parquet(path: Path) -> None:
    with path.open("rb") as f:
        start = f.read(4)
        f.seek(max(path.stat().st_size - 4, 0))
        end = f.read(4)
    if start != b"PAR1" or end != b"PAR1":
        raise InputError(f"{path}: not a Parquet file (no PAR1 magic); write it with pandas.to_parquet or use .jsonl")


def check_data_file(path: Path) -> None:
    """A supported data file whose first rows decode."""
    if path.suffix not in EXTENSIONS:
        raise InputError(f"data.source: {path} has unsupported file type '{path.suffix}'; use one of {', '.join(EXTENSIONS)}")
    {".jsonl": _check_jsonl, ".csv": _check_csv, ".parquet": _check_parquet}[path.suffix](path)


def check_data(cfg: DataConfig) -> None:
    """The data source exists, has a supported format and the first rows of each of its files decode."""
    source = cfg.source
    if source.startswith("hf:"):
        dataset = source[3:].strip()
        if not dataset:
            raise InputError("data.source 'hf:' has no dataset id; write e.g. hf:knkarthick/dialogsum")
        if not Path(dataset).expanduser().exists() and _HUB_ID.fullmatch(dataset):
            check_hub_reachable("data.source", dataset, kind="dataset")
        return
    path = data_dir() if source == "embedded" else Path(source).expanduser()
    if path.is_file():
        check_data_file(path)
        return
    if not path.is_dir():
        raise InputError(f"data.source '{source}': no such file or folder. Use 'embedded', a .jsonl/.csv/.parquet file, "
                         "a folder of <split>.<ext> files, or hf:<dataset id>")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in EXTENSIONS)
    if not files:
        raise InputError(f"data.source '{source}': no split files in {path}; add <split>.jsonl, .csv or .parquet files")
    for file in files:
        check_data_file(file)


def _module_found(module: str) -> bool:
    """Whether ``module`` (dotted) can be imported, found without importing it or its packages."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    for part in rest:
        if spec is None or not spec.submodule_search_locations:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec is not None


def check_reward(cfg: RewardConfig) -> None:
    """The reward can be built: the callable's module is found, the classifier is a folder or a hub id."""
    if cfg.kind == "callable" and cfg.callable:
        module = cfg.callable.partition(":")[0]
        if not _module_found(module):
            raise InputError(f"reward.callable = {cfg.callable!r}: module '{module}' not found. Install the package "
                             "that provides it, or put its folder on PYTHONPATH")
    elif cfg.kind == "hf_classifier" and cfg.model:
        check_model_name("reward.model", cfg.model)


def check_tracking(cfg: Config | None) -> None:
    """An http(s) tracking server answers within :data:`SERVER_TIMEOUT_S` seconds."""
    configured = cfg.tracking.uri if cfg is not None else None
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    origin = "tracking.uri" if configured else "MLFLOW_TRACKING_URI"
    response = net.request(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S)
    if response.status == 0:
        raise EnvironmentFault(
            f"tracking server {net.redact_url(uri)} ({origin}) does not answer ({response.reason or 'no reply'}). "
            f"Start it (detoxflow serve team, or mlflow server), or unset {origin} to use the local store")


def check_model_uri(uri: str, cfg: Config | None) -> None:
    """A model URI has somewhere to come from: an existing folder, or a registry whose store exists."""
    if uri.startswith(_REGISTRY_URI):
        store = tracking_uri(cfg, create=False)
        db = sqlite_path(store)
        if db is not None and not db.is_file():
            raise InputError(f"--model {uri}: no tracking store at {db} (home: {find_home().describe()}). Run the "
                             "pipeline first, pass --home (or set DETOXFLOW_HOME) to the folder that holds "
                             "mlflow.db, or set MLFLOW_TRACKING_URI to the store that holds the registry")
        if db is not None and uri.startswith("models:/"):
            check_registered(uri, db)
        return
    if "://" in uri or uri.startswith("mlflow-artifacts:"):
        return
    if not Path(uri).is_dir():
        raise InputError(f"--model {uri}: no such folder. Pass models:/NAME@alias, models:/NAME/VERSION, "
                         "runs:/RUN_ID/model or a model artifact folder")


def check_registered(uri: str, db: Path) -> None:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` exists in the SQLite store ``db``, read with the
    standard library (no MLflow import, so a miss is said within a second)."""
    import sqlite3

    ref = uri[len("models:/"):]
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=SERVER_TIMEOUT_S)) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM registered_models ORDER BY name")]
            if name not in names:
                known = ", ".join(names) or "none"
                raise InputError(f"--model {uri}: no registered model '{name}' in {db} (registered: {known}). "
                                 "Run the pipeline first, or pass --home / set DETOXFLOW_HOME to another store")
            if alias is not None:
                row = conn.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                                   (name, alias)).fetchone()
                if row is None:
                    have = [r[0] for r in conn.execute(
                        "SELECT alias FROM registered_model_aliases WHERE name = ? ORDER BY alias", (name,))]
                    raise InputError(f"--model {uri}: '{name}' has no alias '{alias}' in {db} (aliases: "
                                     f"{', '.join(have) or 'none'}); use models:/{name}/<version> or another alias")
            elif version is not None and version.isdigit():
                if conn.execute("SELECT 1 FROM model_versions WHERE name = ? AND version = ?",
                                (name, int(version))).fetchone() is None:
                    raise InputError(f"--model {uri}: '{name}' has no version {version} in {db}")
    except sqlite3.Error:
        return  # not a store this check can read (an older schema, a lock): MLflow says what is wrong


def preflight(cfg: Config, *, model_uri: str | None = None) -> None:
    """Every check a pipeline command needs (``model_uri``: the model that evaluate / promote read)."""
    if model_uri is not None:
        check_model_uri(model_uri, cfg)
    check_model_name("model.name_or_path", cfg.model.name_or_path)
    adapter = cfg.model.sft_adapter
    if adapter and _looks_like_path(adapter) and not Path(adapter).expanduser().is_dir():
        raise InputError(f"model.sft_adapter '{adapter}': no such folder; give a peft adapter folder")
    check_data(cfg.data)
    if cfg.orchestration.mode == "local":  # in team mode the reward is built on the gpu worker
        check_reward(cfg.reward)
    check_tracking(cfg)

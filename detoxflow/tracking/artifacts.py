"""Artifacts of a run: what is written into it (JSON, tables, files, folders, the model, the config) and the
named reads callers need (a JSON artifact back, a URL for an image).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from detoxflow.config import Config, dump_yaml
from detoxflow.tracking.backend import TrackingError, _client, artifact_uri, run_id_or_active

if TYPE_CHECKING:
    import pandas as pd


def log_json(obj: Any, artifact_file: str, run_id: str | None = None) -> None:
    """A dict or list as a JSON artifact (``artifact_file`` like ``eval/metrics.json``)."""
    _client().log_text(run_id_or_active(run_id), json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def log_config(cfg: Config, artifact_file: str, run_id: str | None = None) -> None:
    """The whole config as YAML (``config.yaml``: the copy that params, cut at MLflow's limit, never replace)."""
    _client().log_text(run_id_or_active(run_id), dump_yaml(cfg), artifact_file)


def log_table(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None:
    """A table (list of row dicts or a DataFrame) the MLflow UI shows as a table (``artifact_file`` ends in .json).

    Unlike ``mlflow.log_table`` this replaces an existing file instead of appending, so a retried task does not
    duplicate rows."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    if not artifact_file.endswith(".json"):
        raise ValueError(f"log_table: artifact_file '{artifact_file}' must end in .json")
    rid = run_id_or_active(run_id)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    cli = _client()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(artifact_file).name
        df.to_json(local, orient="split", index=False, date_format="iso")
        parent = str(Path(artifact_file).parent)
        cli.log_artifact(rid, str(local), None if parent == "." else parent)
    # The UI lists tables from this tag (the same bookkeeping mlflow.log_table does).
    current = json.loads(cli.get_run(rid).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in current:
        cli.set_tag(rid, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*current, entry]))


def log_file(path: str | os.PathLike[str], artifact_path: str | None = None, run_id: str | None = None) -> None:
    """One local file (a PNG, a report) into the run's artifacts, optionally under a folder."""
    _client().log_artifact(run_id_or_active(run_id), str(path), artifact_path)


def log_dir(local_dir: str | os.PathLike[str], artifact_path: str, run_id: str | None = None) -> str:
    """A directory's contents under ``artifact_path``; returns the artifact URI of that folder."""
    rid = run_id_or_active(run_id)
    src = Path(local_dir)
    if not src.is_dir():
        raise TrackingError(f"log_dir: {src} is not a directory")
    _client().log_artifacts(rid, str(src), artifact_path)
    return artifact_uri(rid, artifact_path)


def log_model_dir(model_dir: str | os.PathLike[str], run_id: str | None = None) -> str:
    """Log a saved policy (``Policy.save_artifact``'s folder) as the run's MLflow pyfunc model ``model``
    (:func:`detoxflow.tracking.pyfunc.log_policy`); returns its URI, ``models:/<model id>``."""
    from detoxflow.tracking.pyfunc import log_policy

    if not (Path(model_dir) / "detoxflow.json").is_file():
        raise TrackingError(f"log_model_dir: {model_dir} has no detoxflow.json; pass the folder Policy.save_artifact wrote")
    return f"models:/{log_policy(model_dir, run_id_or_active(run_id))}"


def load_json(run_id: str, artifact_file: str) -> Any:
    """A JSON artifact of run ``run_id`` (as :func:`log_json` wrote it), downloaded and parsed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _client().download_artifacts(run_id, artifact_file, tmp)
        return json.loads(Path(path).read_text(encoding="utf-8"))


def artifact_url(run_id: str, artifact_path: str) -> str:
    """A URL for a logged file (an image a Prefect artifact shows): the MLflow server's artifact endpoint, or the
    artifact's storage URI for a local store."""
    uri = _client().tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/get-artifact?path={quote(artifact_path)}&run_uuid={run_id}"
    return artifact_uri(run_id, artifact_path)

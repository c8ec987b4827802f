"""The model store: model URIs to local folders (fetch, into a content-addressed cache) and to a Policy (load).

:func:`load_model` turns ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN/model``, ``models:/<model
id>`` or a local directory into a :class:`~detoxflow.models.policy.Policy`, downloading through the tracking
server into the model cache, so only the tracking server must be reachable. :func:`load_generator` loads the
same folder as the pyfunc model (:class:`~detoxflow.tracking.pyfunc.PolicyModel`, through MLflow's own loader
when the folder is an MLflow model), which ``detoxflow generate`` calls. A folder is either an MLflow model (an
``MLmodel`` file, the policy's parts under ``artifacts/``) or, for versions registered before the policy was an
MLflow model, the parts themselves; both load.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException

from detoxflow import paths
from detoxflow.atomic import publish
from detoxflow.locks import sqlite_path
from detoxflow.tracking.backend import TrackingError, _client
from detoxflow.tracking.pyfunc import policy_root

if TYPE_CHECKING:
    from detoxflow.models.policy import Policy
    from detoxflow.tracking.pyfunc import PolicyModel

log = logging.getLogger("detoxflow.tracking")  # the name users saw before the split

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+?)/?$")


def resolve_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> (name, version, artifact source URI)."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise TrackingError(f"'{uri}' is not a registry URI; expected models:/NAME@alias or models:/NAME/VERSION")
    name, alias, version = m["name"], m["alias"], m["version"]
    cli = _client()
    try:
        mv = cli.get_model_version_by_alias(name, alias) if alias else cli.get_model_version(name, version)
    except MlflowException as e:
        hint = ""
        with contextlib.suppress(MlflowException):
            rm = cli.get_registered_model(name)
            hint = f" Aliases present: {', '.join(sorted(rm.aliases)) or 'none'}."
        raise TrackingError(
            f"{uri}: not found at tracking URI {mlflow.get_tracking_uri()}.{hint} Set MLFLOW_TRACKING_URI to the "
            "server that holds the registry, or run the pipeline first"
        ) from e
    source = mv.source
    if not source or source.startswith("models:/"):
        source = cli.get_model_version_download_uri(name, str(mv.version))
    return name, str(mv.version), source


def _local_path(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme == "" and uri:
        return Path(uri)
    return None


def _download(source: str, key: str) -> Path:
    """Download ``source`` into the model cache under ``key`` (once; atomic, so concurrent loads are safe)."""
    root = model_cache_dir()
    dest = root / key
    if policy_root(dest) is not None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp)))
        if policy_root(local) is None:
            raise TrackingError(f"{source} is not a detoxflow model (no detoxflow.json in it or its artifacts/)")
        try:
            publish(local, dest, if_exists="fail")
        except OSError:
            if policy_root(dest) is None:  # not a concurrent download that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_cache_dir() -> Path:
    """Downloaded model versions: ``<cache>/models/<tracking uri hash>/...`` (versions are immutable)."""
    return paths.cache_dir() / "models"


def use_store(tracking_uri: str | None = None, what: str = "the registry") -> str:
    """Point MLflow at ``tracking_uri``, else at ``$MLFLOW_TRACKING_URI`` (or a URI already set), else at the
    home's local store, the one a local ``detoxflow run`` writes to; returns the URI. Reading creates nothing: a
    local store that does not exist raises TrackingError, its message starting with ``what``."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    elif not os.environ.get("MLFLOW_TRACKING_URI") and not mlflow.is_tracking_uri_set():
        default = paths.tracking_uri(None, create=False)
        db = sqlite_path(default)
        if db is not None and not db.is_file():
            raise TrackingError(f"{what}: no tracking store here ({db} does not exist). Run the pipeline "
                                "first, or set MLFLOW_TRACKING_URI to the store that holds the registry")
        mlflow.set_tracking_uri(default)
    return str(mlflow.get_tracking_uri())


def fetch_model(uri: str, tracking_uri: str | None = None) -> Path:
    """The local directory of a model (an MLflow model, or an artifact folder logged before the policy was one),
    downloading it through the tracking server when needed."""
    path = Path(uri)
    if path.is_dir():
        return path
    use_store(tracking_uri, f"model '{uri}'")
    store = hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:12]
    logged = _LOGGED_MODEL_URI.match(uri)
    if logged:
        return _download(uri, f"{store}/logged/{logged['id']}")
    if uri.startswith("models:/"):
        name, version, source = resolve_model_uri(uri)
        local = _local_path(source)
        if local is not None and policy_root(local) is not None:
            return local  # a local store: read in place, no copy of the base weights
        return _download(source, f"{store}/{name}/v{version}")
    if uri.startswith("runs:/"):
        m = _RUNS_URI.match(uri)
        if not m:
            raise TrackingError(f"'{uri}': expected runs:/RUN_ID/model")
        return _download(uri, f"{store}/runs/{m['run']}/{m['path']}")
    if "://" in uri or uri.startswith("mlflow-artifacts:"):
        return _download(uri, f"{store}/uri/{hashlib.sha256(uri.encode()).hexdigest()[:16]}")
    raise TrackingError(
        f"model '{uri}' not found: pass models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, "
        "models:/<model id> or an existing model directory"
    )


def load_model(uri: str, *, tracking_uri: str | None = None, device: str = "auto") -> Policy:
    """A :class:`Policy` from ``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/RUN/model`` or a directory.

    Only the tracking server must be reachable: artifacts are downloaded through it into the model cache."""
    from detoxflow.models.policy import Policy

    local = fetch_model(uri, tracking_uri)
    root = policy_root(local)
    if root is None:
        raise TrackingError(f"model '{uri}': {local} holds no detoxflow policy (no detoxflow.json in it or in its "
                            "artifacts/); pass a model that detoxflow logged")
    log.info("loading model %s from %s", uri, root)
    return Policy.from_artifact(root, device=device)


def load_generator(uri: str, *, tracking_uri: str | None = None) -> PolicyModel:
    """The pyfunc model of ``uri`` (any URI :func:`load_model` takes): an MLflow model folder loads through
    ``mlflow.pyfunc.load_model`` (the path ``mlflow models serve`` takes), a folder logged before the policy was
    an MLflow model through the same wrapper class."""
    from detoxflow.tracking.pyfunc import PolicyModel

    local = fetch_model(uri, tracking_uri)
    if (local / "MLmodel").is_file():
        loaded = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
        if not isinstance(loaded, PolicyModel):
            raise TrackingError(f"model '{uri}' is an MLflow model but not a detoxflow policy "
                                f"({type(loaded).__name__}); pass a model that detoxflow logged")
        return loaded
    root = policy_root(local)
    if root is None:
        raise TrackingError(f"model '{uri}': {local} holds no detoxflow policy; pass a model that detoxflow logged")
    return PolicyModel.from_folder(root)

"""MLflow 3 tracking, the model registry and model loading: the one place detoxflow talks to MLflow.

Tracking store: ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite at ``<work_dir>/mlflow.db``
with artifacts under ``<work_dir>/mlartifacts``. A team points every machine at the MLflow server
(``http://mlflow:5000``), which proxies artifacts (``--serve-artifacts``), so a client needs nothing else.

Runs: one parent run per pipeline (:func:`parent_run`) with the flattened config as params and lineage tags,
and one child run per stage (:func:`child_run`). Prefect tasks may run in other threads or processes, where
MLflow's (thread-local) active run is not visible: every function here therefore accepts an explicit
``run_id`` / ``parent_run_id``, and a retried stage resumes its earlier child run instead of adding a new one.

Registry: aliases, never stages. :func:`register_model` adds a version and points ``challenger`` at it; the
promotion gate moves ``champion`` with :func:`set_champion` while holding :func:`detoxflow.locks.gate_lock`.

Loading: :func:`load_model` turns ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN/model`` or a
local directory into a :class:`~detoxflow.models.policy.Policy`, downloading through the tracking server into
a content-addressed cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

import detoxflow
from detoxflow.atomic import publish
from detoxflow.config import Config, dump_yaml
from detoxflow.locks import gate_lock, sqlite_path
from detoxflow.paths import PROJECT_ROOT, cache_dir, work_dir

if TYPE_CHECKING:
    import pandas as pd

    from detoxflow.models.policy import Policy

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"

# Run tags (detoxflow.*) and version tags; one name, one meaning, read back by the gate and the report.
TAG_STAGE = "detoxflow.stage"
TAG_CONFIG_DIGEST = "detoxflow.config_digest"
TAG_VERSION = "detoxflow.version"
TAG_GIT_SHA = "detoxflow.git_sha"
TAG_GIT_DIRTY = "detoxflow.git_dirty"
TAG_BASE_MODEL = "detoxflow.base_model"
TAG_REWARD_MODEL = "detoxflow.reward_model"
TAG_CONFIG_NAME = "detoxflow.config_name"
TAG_SPLIT_DIGEST = "detoxflow.split_digest"  # version tag: digest of the held-out split it was evaluated on
METRIC_TAG_PREFIX = "metric."  # version tags "metric.eval/toxicity_mean" = "0.0123"

# MLflow limits (mlflow.utils.validation): params are strings of at most 6000 characters, 100 params or tags
# and 1000 metrics per log_batch call.
MAX_PARAM_CHARS = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_VERSION_TAG_CHARS = 5000  # far below MLflow's 100 000: tags are for reading in the UI, artifacts for bulk
_TRUNCATED = "...[truncated]"


class TrackingError(RuntimeError):
    """A tracking or registry problem a user can fix; the message names the run, model or URI and the fix."""


# ------------------------------------------------------------------------------------------ store and setup


def tracking_uri(cfg: Config | None = None) -> str:
    """``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<work_dir>/mlflow.db``."""
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    wd = work_dir((cfg or Config()).work_dir)
    return f"sqlite:///{wd / 'mlflow.db'}"


_default_tracking_uri = tracking_uri  # load_model's keyword argument shadows the name


def _is_server(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


def artifact_location(cfg: Config, uri: str | None = None) -> str | None:
    """Artifact root for a new experiment, or None to let an MLflow server choose (it proxies artifacts).

    A database URI used directly has no artifact store of its own; MLflow would fall back to ``./mlruns``
    relative to whatever directory the process happens to run in. We pin it: beside a SQLite file, else under
    the work dir."""
    uri = uri or tracking_uri(cfg)
    if _is_server(uri):
        return None
    db = sqlite_path(uri)
    if db is not None:
        return (db.parent / "mlartifacts").as_uri()
    return (work_dir(cfg.work_dir) / "mlartifacts").as_uri()


_setup_lock = threading.Lock()


def setup(cfg: Config) -> str:
    """Point MLflow at the config's tracking URI and experiment (created if absent); returns the experiment id.

    Idempotent and safe when several processes race to create the experiment, or, on a fresh SQLite store, the
    store itself: MLflow creates its tables on first use, and two processes doing that at once fail with "table ...
    already exists", so on SQLite a file lock next to the database serialises that first use."""
    uri = tracking_uri(cfg)
    # MLflow writes "View run ... at: URL" to stdout after every run on a server; stdout is the CLI's JSON
    # output, so the link goes to the log instead (parent_run logs it).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    with _setup_lock, _sqlite_init_lock(uri):
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        name = cfg.tracking.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name, artifact_location=artifact_location(cfg, uri))
            except MlflowException:
                # another process created it between our read and our create
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                log.warning("MLflow experiment '%s' was deleted; restoring it", name)
                client.restore_experiment(exp_id)
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """An inter-process lock on ``<db>.init.lock`` for a SQLite tracking URI; nothing for a server."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".init.lock", timeout=300):
        yield


def client() -> MlflowClient:
    """A client for the current tracking URI (call :func:`setup` first in a fresh process)."""
    return MlflowClient(mlflow.get_tracking_uri())


# ------------------------------------------------------------------------------------------ params and tags


def _param_value(value: Any) -> str:
    """One param value as MLflow stores it: strings as they are, everything else as JSON; cut at 6000 chars."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_PARAM_CHARS:
        text = text[: MAX_PARAM_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return text


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params: ``{'ppo.kl.target': '6.0', 'lora.target_modules': 'null', ...}``.

    The full config also goes into the run as ``config.yaml``, so a truncated value is never the only copy."""
    return {k: _param_value(v) for k, v in cfg.flat().items()}


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


def run_tags(cfg: Config) -> dict[str, str]:
    """Lineage tags of a pipeline run: git sha, base and reward model ids, config digest, detoxflow version."""
    base, reward = model_ids(cfg)
    tags = {
        TAG_CONFIG_DIGEST: cfg.digest(),
        TAG_CONFIG_NAME: cfg.name,
        TAG_VERSION: detoxflow.__version__,
        TAG_BASE_MODEL: base,
        TAG_REWARD_MODEL: reward,
    }
    sha, dirty = git_state()
    if sha:
        tags[TAG_GIT_SHA] = sha
        tags[MLFLOW_GIT_COMMIT] = sha  # the MLflow UI shows this one
        if dirty is not None:
            tags[TAG_GIT_DIRTY] = str(dirty).lower()
    return tags


def _log_params(cli: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params that the run lacks; a resumed run whose params differ is a different experiment: refuse it."""
    existing = cli.get_run(run_id).data.params
    conflicts = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    if conflicts:
        shown = "; ".join(f"{k}: run has {a!r}, config has {b!r}" for k, (a, b) in list(conflicts.items())[:5])
        raise TrackingError(
            f"run {run_id} was started with a different config ({shown}). Resume it with the same config, "
            "or start a new run"
        )
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
        cli.log_batch(run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)


def set_tags(tags: Mapping[str, Any], run_id: str | None = None) -> None:
    """Set run tags (values stringified; non-strings as JSON)."""
    rid = _run_id(run_id)
    items = [RunTag(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client().log_batch(rid, tags=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)


# ------------------------------------------------------------------------------------------ runs


def _run_id(run_id: str | None) -> str:
    if run_id:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise TrackingError(
            "no MLflow run: pass run_id=... or call this inside `with parent_run(cfg)` / `with child_run(...)` "
            "(the active run is per thread, so a Prefect task in a worker thread must pass the id)"
        )
    return active.info.run_id


@contextlib.contextmanager
def parent_run(
    cfg: Config, run_name: str | None = None, *, run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
    """The pipeline's MLflow run; yields its run id (pass it to tasks as ``parent_run_id``).

    Params = the flattened config, tags = :func:`run_tags`, ``config.yaml`` as an artifact. ``run_id`` resumes
    an existing run (e.g. a retried flow run); its params must match the config. Started inside another
    active run (a KL sweep), it becomes that run's child. The run ends FINISHED, or FAILED on an exception."""
    exp_id = setup(cfg)
    cli = client()
    all_tags = {**run_tags(cfg), **(tags or {})}
    nested = mlflow.active_run() is not None
    if run_id is not None:
        try:
            existing = cli.get_run(run_id)
        except MlflowException as e:
            raise TrackingError(f"cannot resume run {run_id}: not found at {mlflow.get_tracking_uri()} ({e})") from e
        if existing.info.experiment_id != exp_id:
            raise TrackingError(
                f"cannot resume run {run_id}: it belongs to experiment {existing.info.experiment_id}, the config's "
                f"tracking.experiment '{cfg.tracking.experiment}' is {exp_id}"
            )
        ctx = mlflow.start_run(run_id=run_id, nested=nested, tags=all_tags)
    else:
        ctx = mlflow.start_run(experiment_id=exp_id, run_name=run_name or cfg.name, nested=nested, tags=all_tags)
    with ctx as run:
        rid = run.info.run_id
        _log_params(cli, rid, config_params(cfg))
        cli.log_text(rid, dump_yaml(cfg), "config.yaml")
        log.info("MLflow run %s (%s): %s", rid, run_name or cfg.name, run_url(rid, exp_id))
        yield rid


def run_url(run_id: str, experiment_id: str) -> str:
    """The run's page in the MLflow UI when the store is a server, else ``<tracking uri> run <id>``."""
    uri = mlflow.get_tracking_uri()
    if _is_server(uri):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} run {run_id}"


def find_child_run(parent_run_id: str, stage: str, *, unfinished_only: bool = True) -> str | None:
    """The newest child of ``parent_run_id`` for ``stage`` (unfinished ones only, by default), or None."""
    cli = client()
    exp_id = cli.get_run(parent_run_id).info.experiment_id
    safe_stage = stage.replace("'", "\\'")
    runs = cli.search_runs(
        [exp_id],
        filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}' and tags.`{TAG_STAGE}` = '{safe_stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=10,
    )
    for r in runs:
        if not unfinished_only or r.info.status != RunStatus.to_string(RunStatus.FINISHED):
            return r.info.run_id
    return None


@contextlib.contextmanager
def child_run(
    stage: str,
    parent_run_id: str | None = None,
    *,
    cfg: Config | None = None,
    resume: bool = True,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """A nested run for one pipeline stage; yields its run id.

    ``parent_run_id``: the id :func:`parent_run` yielded (needed in a Prefect worker thread or another process;
    defaults to this thread's active run). ``cfg``: call :func:`setup` first (needed in a fresh process unless
    ``$MLFLOW_TRACKING_URI`` is set). ``resume``: a retried stage continues its earlier unfinished child run
    (same parent, same ``stage``) rather than leaving a failed run beside a new one. Stage names must be
    unique within one parent (e.g. ``train``, ``evaluate_baseline``, ``evaluate_aligned``)."""
    if cfg is not None:
        setup(cfg)
    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active else None)
    if parent is None:
        raise TrackingError(
            f"child_run('{stage}'): no parent run. Pass parent_run_id= (the id `with parent_run(cfg) as run_id` "
            "yields) or call it inside the parent run"
        )
    if active is not None and active.info.run_id != parent:
        raise TrackingError(
            f"child_run('{stage}'): this thread's active run {active.info.run_id} is not the parent {parent}; "
            "end it first (stages do not nest inside other stages)"
        )
    cli = client()
    try:
        parent_info = cli.get_run(parent).info
    except MlflowException as e:
        raise TrackingError(
            f"child_run('{stage}'): parent run {parent} not found at {mlflow.get_tracking_uri()}. Is this process "
            "pointed at the same tracking URI as the flow (pass cfg= or set MLFLOW_TRACKING_URI)?"
        ) from e
    all_tags = {TAG_STAGE: stage, **(tags or {})}
    existing = find_child_run(parent, stage) if resume else None
    nested = active is not None
    if existing is not None:
        log.info("resuming MLflow child run %s for stage '%s'", existing, stage)
        ctx = mlflow.start_run(run_id=existing, nested=nested, tags=all_tags)
    else:
        # experiment_id must be the parent's: a nested start_run otherwise lands in the process's current
        # (possibly default) experiment and the child never shows up under its parent.
        ctx = mlflow.start_run(
            experiment_id=parent_info.experiment_id, run_name=stage, parent_run_id=parent, nested=True, tags=all_tags
        )
    with ctx as run:
        yield run.info.run_id


# ------------------------------------------------------------------------------------------ metrics


class MetricLogger:
    """The trainer's ``log(metrics, step)`` callable: one ``log_batch`` per call, non-finite values skipped.

    Works from any thread or process given the run id (and the tracking URI set by :func:`setup` or env)."""

    def __init__(self, run_id: str, tracking_uri: str | None = None, prefix: str = "") -> None:
        self.run_id = run_id
        self.prefix = prefix
        self._client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        self.skipped: dict[str, int] = {}  # key -> number of non-finite values dropped

    def __call__(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        batch: list[Metric] = []
        bad: list[str] = []
        for key, value in metrics.items():
            name = f"{self.prefix}{key}"
            try:
                x = float(value)
            except (TypeError, ValueError):
                bad.append(f"{name}={value!r} (not a number)")
                continue
            if not math.isfinite(x):
                bad.append(f"{name}={x}")
                continue
            batch.append(Metric(name, x, ts, int(step)))
        if bad:
            new = [b for b in bad if b.split("=", 1)[0] not in self.skipped]
            for b in bad:
                k = b.split("=", 1)[0]
                self.skipped[k] = self.skipped.get(k, 0) + 1
            # warn once per key: a metric that is NaN every step would otherwise flood the log
            (log.warning if new else log.debug)(
                "step %d: skipped metrics that MLflow cannot store: %s", step, ", ".join(bad)
            )
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH], synchronous=True)


def metric_logger(run_id: str | None = None, *, prefix: str = "") -> MetricLogger:
    """``log = metric_logger(run_id); log({'objective/kl': 0.3}, step=1)`` — see :class:`MetricLogger`."""
    return MetricLogger(_run_id(run_id), prefix=prefix)


def log_metrics(metrics: Mapping[str, Any], step: int = 0, run_id: str | None = None) -> None:
    """Log final metrics (``eval/*``) the same way the trainer's curve metrics are logged."""
    MetricLogger(_run_id(run_id))(metrics, step)


# ------------------------------------------------------------------------------------------ data lineage


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

    rid = _run_id(run_id)
    cli = client()
    df = pd.DataFrame({"id": [str(i) for i in ids]})
    dataset = mlflow.data.from_pandas(df, source=_dataset_source(source, split_name), name=split_name, digest=digest)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    _log_inputs(cli, rid, inputs)
    cli.log_dict(rid, {"split": split_name, "digest": digest, "source": source, "n": len(ids), "ids": list(map(str, ids))},
                 f"data/{split_name}.ids.json")
    set_tags({f"detoxflow.data.{split_name}.digest": digest, f"detoxflow.data.{split_name}.n": str(len(ids))}, rid)


# ------------------------------------------------------------------------------------------ artifacts


def log_json(obj: Any, artifact_file: str, run_id: str | None = None) -> None:
    """A dict or list as a JSON artifact (``artifact_file`` like ``eval/metrics.json``)."""
    client().log_text(_run_id(run_id), json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    client().log_text(_run_id(run_id), text, artifact_file)


def log_table(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None:
    """A table (list of row dicts or a DataFrame) the MLflow UI shows as a table (``artifact_file`` ends in .json).

    Unlike ``mlflow.log_table`` this replaces an existing file instead of appending, so a retried task does not
    duplicate rows."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    if not artifact_file.endswith(".json"):
        raise ValueError(f"log_table: artifact_file '{artifact_file}' must end in .json")
    rid = _run_id(run_id)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    cli = client()
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


def log_figure(figure: Any, artifact_file: str, run_id: str | None = None) -> None:
    """A matplotlib figure as an image artifact (``plots/reward.png``)."""
    client().log_figure(_run_id(run_id), figure, artifact_file)


def log_file(path: str | os.PathLike[str], artifact_path: str | None = None, run_id: str | None = None) -> None:
    """One local file (a PNG, a report) into the run's artifacts, optionally under a folder."""
    client().log_artifact(_run_id(run_id), str(path), artifact_path)


def log_dir(local_dir: str | os.PathLike[str], artifact_path: str, run_id: str | None = None) -> str:
    """A directory's contents under ``artifact_path``; returns the artifact URI of that folder."""
    rid = _run_id(run_id)
    src = Path(local_dir)
    if not src.is_dir():
        raise TrackingError(f"log_dir: {src} is not a directory")
    cli = client()
    cli.log_artifacts(rid, str(src), artifact_path)
    return f"{cli.get_run(rid).info.artifact_uri.rstrip('/')}/{artifact_path}"


def log_model_dir(model_dir: str | os.PathLike[str], run_id: str | None = None, artifact_path: str = "model") -> str:
    """Log a saved model artifact (``Policy.save_artifact``'s folder) as ``model/``; returns its artifact URI."""
    if not (Path(model_dir) / "detoxflow.json").is_file():
        raise TrackingError(f"log_model_dir: {model_dir} has no detoxflow.json; pass the folder Policy.save_artifact wrote")
    return log_dir(model_dir, artifact_path, run_id)


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version, without MLflow types (what the gate and the report read)."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def metrics(self) -> dict[str, float]:
        """Metrics stored as ``metric.<key>`` version tags by :func:`register_model`."""
        out = {}
        for k, v in self.tags.items():
            if k.startswith(METRIC_TAG_PREFIX):
                with contextlib.suppress(ValueError):
                    out[k[len(METRIC_TAG_PREFIX):]] = float(v)
        return out

    @property
    def split_digest(self) -> str | None:
        return self.tags.get(TAG_SPLIT_DIGEST)


def _version_info(mv: Any) -> VersionInfo:
    return VersionInfo(
        name=mv.name, version=str(mv.version), run_id=mv.run_id or None, source=mv.source,
        tags=dict(mv.tags or {}), aliases=tuple(mv.aliases or ()),
    )


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_VERSION_TAG_CHARS:
        text = text[: MAX_VERSION_TAG_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return text


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """``{'eval/toxicity_mean': 0.1}`` -> ``{'metric.eval/toxicity_mean': '0.1'}`` (finite numbers only)."""
    out = {}
    for k, v in metrics.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out[f"{METRIC_TAG_PREFIX}{k}"] = repr(x)
    return out


def _split_digest_from_runs(cli: MlflowClient, run_id: str, split: str) -> str | None:
    """The eval split digest logged by :func:`log_split` on the run or any of its ancestors."""
    key = f"detoxflow.data.{split}.digest"
    rid: str | None = run_id
    for _ in range(5):
        if rid is None:
            return None
        run = cli.get_run(rid)
        if key in run.data.tags:
            return run.data.tags[key]
        rid = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    return None


def register_model(
    cfg: Config,
    run_id: str,
    artifact_subpath: str = "model",
    *,
    metrics: Mapping[str, Any] | None = None,
    split_digest: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = CHALLENGER,
) -> str:
    """Register the run's model artifact as a new version of ``cfg.registered_model_name``; returns the version.

    Creates the registered model if absent, points ``alias`` (``challenger``) at the new version, and tags it
    with the config digest, base/reward model ids, the eval split digest (``split_digest`` or the one
    :func:`log_split` recorded on the run or its parent) and ``metrics`` as ``metric.<key>`` tags. Runs under
    :func:`~detoxflow.locks.gate_lock`, so versions and the alias move in the same order (re-entrant: a gate
    that already holds the lock may call it)."""
    setup(cfg)
    cli = client()
    name = cfg.registered_model_name
    try:
        run = cli.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"register_model: run {run_id} not found at {mlflow.get_tracking_uri()}") from e
    if not cli.list_artifacts(run_id, artifact_subpath):
        raise TrackingError(
            f"register_model: run {run_id} has no artifact '{artifact_subpath}/'. Log the model first with "
            f"log_model_dir(dir, run_id=...)"
        )
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_subpath}"
    base, reward = model_ids(cfg)
    digest = split_digest or _split_digest_from_runs(cli, run_id, cfg.data.eval_split)
    all_tags: dict[str, str] = {
        TAG_CONFIG_DIGEST: cfg.digest(),
        TAG_CONFIG_NAME: cfg.name,
        TAG_VERSION: detoxflow.__version__,
        TAG_BASE_MODEL: base,
        TAG_REWARD_MODEL: reward,
        **({TAG_SPLIT_DIGEST: digest} if digest else {}),
        **metric_tags(metrics or {}),
        **{k: _tag_value(v) for k, v in (tags or {}).items()},
    }
    sha, _ = git_state()
    if sha:
        all_tags[TAG_GIT_SHA] = sha
    with gate_lock(cfg):
        _ensure_registered_model(cli, name, cfg)
        mv = cli.create_model_version(name, source=source, run_id=run_id, tags=all_tags)
        if alias:
            cli.set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s version %s (alias %s) from %s", name, mv.version, alias, source)
    return str(mv.version)


def _ensure_registered_model(cli: MlflowClient, name: str, cfg: Config) -> None:
    try:
        cli.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        cli.create_registered_model(
            name,
            tags={TAG_CONFIG_NAME: cfg.name},
            description=f"detoxflow policy '{cfg.name}': base {model_ids(cfg)[0]} + LoRA adapter trained with PPO. "
            "Aliases: challenger = newest trained version, champion = promoted by the gate.",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process won the race: fine
            raise


def get_version(name: str, version: str | int) -> VersionInfo:
    try:
        return _version_info(client().get_model_version(name, str(version)))
    except MlflowException as e:
        raise TrackingError(f"model version {name}/{version} not found at {mlflow.get_tracking_uri()}") from e


def get_alias(name: str, alias: str) -> VersionInfo | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist (no champion yet)."""
    try:
        return _version_info(client().get_model_version_by_alias(name, alias))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def set_alias(name: str, alias: str, version: str | int) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def set_champion(name: str, version: str | int) -> None:
    """Point ``champion`` at ``version``; call it inside ``with gate_lock(cfg)`` after the decision."""
    set_alias(name, CHAMPION, version)
    log.info("%s: champion -> version %s", name, version)


def tag_version(name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Set version tags (the gate's decision and reasons); non-strings as JSON, long values truncated."""
    cli = client()
    for k, v in tags.items():
        cli.set_model_version_tag(name, str(version), k, _tag_value(v))


def list_versions(name: str) -> list[VersionInfo]:
    """All versions of a registered model, oldest first (empty when the model does not exist)."""
    found = client().search_model_versions(f"name = '{name}'")
    return sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version))


# ------------------------------------------------------------------------------------------ loading


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+?)/?$")


def resolve_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> (name, version, artifact source URI)."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise TrackingError(f"'{uri}' is not a registry URI; expected models:/NAME@alias or models:/NAME/VERSION")
    name, alias, version = m["name"], m["alias"], m["version"]
    cli = client()
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
    if (dest / "detoxflow.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp)))
        if not (local / "detoxflow.json").is_file():
            raise TrackingError(f"{source} is not a detoxflow model artifact (no detoxflow.json)")
        publish(local, dest, if_exists="keep")  # a concurrent download may have published it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def model_cache_dir() -> Path:
    """Downloaded model versions: ``<cache>/models/<tracking uri hash>/...`` (versions are immutable)."""
    return cache_dir() / "models"


def fetch_model(uri: str, tracking_uri: str | None = None) -> Path:
    """The local directory of a model artifact, downloading it through the tracking server when needed."""
    path = Path(uri)
    if path.is_dir():
        return path
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    elif not os.environ.get("MLFLOW_TRACKING_URI") and not mlflow.is_tracking_uri_set():
        # the same default store a local `detoxflow run` writes to
        mlflow.set_tracking_uri(_default_tracking_uri(None))
    store = hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:12]
    if uri.startswith("models:/"):
        name, version, source = resolve_model_uri(uri)
        local = _local_path(source)
        if local is not None and (local / "detoxflow.json").is_file():
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
        f"model '{uri}' not found: pass models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model or an "
        "existing model artifact directory"
    )


def load_model(uri: str, *, tracking_uri: str | None = None, device: str = "auto") -> Policy:
    """A :class:`Policy` from ``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/RUN/model`` or a directory.

    Only the tracking server must be reachable: artifacts are downloaded through it into the model cache."""
    from detoxflow.models.policy import Policy

    local = fetch_model(uri, tracking_uri)
    log.info("loading model %s from %s", uri, local)
    return Policy.from_artifact(local, device=device)


__all__ = [
    "CHALLENGER", "CHAMPION", "MetricLogger", "TrackingError", "VersionInfo", "child_run", "config_params",
    "fetch_model", "find_child_run", "get_alias", "get_version", "list_versions", "load_model",
    "log_dir", "log_figure", "log_file", "log_json", "log_metrics", "log_model_dir", "log_split", "log_table",
    "log_text", "metric_logger", "parent_run", "register_model", "run_tags", "set_alias", "set_champion",
    "set_tags", "setup", "tag_version", "tracking_uri",
]

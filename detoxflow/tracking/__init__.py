"""MLflow 3 tracking, the model registry and model loading: the only package of detoxflow that imports MLflow.

It hands out no MLflow client: callers (tasks, the CLI) use the named functions re-exported here, e.g.
``from detoxflow import tracking; tracking.setup(cfg)``. Flows do not call it: a task or the ``Stage`` of
:mod:`detoxflow.tasks.stages` records their outcomes. One concern per module:

- :mod:`~detoxflow.tracking.backend`: where the store is (``cfg.tracking.uri``, ``$MLFLOW_TRACKING_URI`` or
  SQLite in the work dir), ``setup`` (experiment, SQLite init lock), run ids and tags, names and limits;
- :mod:`~detoxflow.tracking.runs`: params, the parent run of a flow and a child run per stage, run URLs,
  the metric logger, and what resuming needs (the fingerprint tag, the heartbeat lease, unfinished runs);
- :mod:`~detoxflow.tracking.artifacts`: JSON, tables, files, folders, the model and the config into a run,
  and the reads callers need (a JSON artifact, an artifact URL);
- :mod:`~detoxflow.tracking.lineage`: the lineage tags (built once), data splits as dataset inputs;
- :mod:`~detoxflow.tracking.registry`: versions, aliases, version tags and descriptions, the gate's lock;
- :mod:`~detoxflow.tracking.pyfunc`: the policy as an MLflow pyfunc model (logged through the logged-model API,
  its metrics, its model card);
- :mod:`~detoxflow.tracking.store`: model URIs to local folders (fetch into the cache), to a ``Policy`` and to
  the pyfunc model ``detoxflow generate`` calls;
- :mod:`~detoxflow.tracking.migrate`: versions registered before the policy was an MLflow model re-registered
  as pyfunc models, their aliases moved (``detoxflow registry migrate``).
"""

from detoxflow.locks import gate_lock
from detoxflow.paths import tracking_uri
from detoxflow.tracking.artifacts import (
    artifact_url,
    load_json,
    log_config,
    log_dir,
    log_file,
    log_json,
    log_model_dir,
    log_table,
)
from detoxflow.tracking.backend import (
    CHALLENGER,
    CHAMPION,
    EXPERIMENT_KIND,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_VERSION_TAG_CHARS,
    METRIC_TAG_PREFIX,
    TAG_BASE_MODEL,
    TAG_CONFIG_DIGEST,
    TAG_CONFIG_NAME,
    TAG_EXPERIMENT_KIND,
    TAG_GIT_DIRTY,
    TAG_GIT_SHA,
    TAG_REWARD_MODEL,
    TAG_SPLIT_DIGEST,
    TAG_STAGE,
    TAG_VERSION,
    TrackingError,
    TrackingUnreachable,
    artifact_location,
    artifact_uri,
    set_tags,
    setup,
)
from detoxflow.tracking.lineage import git_state, lineage_tags, log_split, model_ids, run_tags
from detoxflow.tracking.migrate import TAG_MIGRATED_FROM, Migration, migrate_registry, migration_report
from detoxflow.tracking.pyfunc import PolicyModel, model_card, write_model_card
from detoxflow.tracking.registry import (
    VersionInfo,
    describe_version,
    get_alias,
    get_version,
    list_versions,
    metric_tags,
    register_model,
    set_alias,
    set_champion,
    tag_version,
    untag_version,
    version_metrics,
)
from detoxflow.tracking.runs import (
    TAG_ABANDONED,
    TAG_LEASE_HOLDER,
    TAG_LEASE_UNTIL,
    TAG_RESUME_KEY,
    Heartbeat,
    MetricLogger,
    ResumeError,
    UnfinishedRun,
    child_run,
    config_params,
    find_child_run,
    find_run_by_tag,
    last_logged_step,
    lease_holder,
    log_metrics,
    log_params,
    mark_abandoned,
    metric_logger,
    parent_run,
    run_url,
    unfinished_runs,
)
from detoxflow.tracking.store import (
    fetch_model,
    load_generator,
    load_model,
    model_cache_dir,
    resolve_model_uri,
    use_store,
)

__all__ = [
    "TAG_ABANDONED", "TAG_LEASE_HOLDER", "TAG_LEASE_UNTIL", "TAG_RESUME_KEY", "Heartbeat", "ResumeError",
    "UnfinishedRun", "last_logged_step", "lease_holder", "mark_abandoned", "unfinished_runs",
    "CHALLENGER", "CHAMPION", "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH", "MAX_PARAM_CHARS",
    "MAX_VERSION_TAG_CHARS", "METRIC_TAG_PREFIX", "TAG_BASE_MODEL", "TAG_CONFIG_DIGEST", "TAG_CONFIG_NAME",
    "TAG_GIT_DIRTY", "TAG_GIT_SHA", "TAG_REWARD_MODEL", "TAG_SPLIT_DIGEST", "TAG_STAGE", "TAG_VERSION",
    "MetricLogger", "TrackingError", "TrackingUnreachable", "VersionInfo", "artifact_location", "artifact_uri", "artifact_url",
    "child_run", "config_params", "fetch_model", "find_child_run", "find_run_by_tag", "gate_lock", "get_alias",
    "get_version", "git_state", "lineage_tags", "list_versions", "load_json", "load_model", "log_config",
    "log_dir", "log_file", "log_json", "log_metrics", "log_model_dir", "log_params", "log_split", "log_table",
    "metric_logger", "metric_tags", "model_cache_dir", "model_ids", "parent_run", "register_model",
    "resolve_model_uri", "run_tags", "run_url", "set_alias", "set_champion", "set_tags", "setup", "tag_version",
    "tracking_uri", "untag_version",
    "PolicyModel", "describe_version", "load_generator", "model_card", "version_metrics", "write_model_card",
    "EXPERIMENT_KIND", "TAG_EXPERIMENT_KIND",
    "TAG_MIGRATED_FROM", "Migration", "migrate_registry", "migration_report", "use_store",
]

"""Where things live: the project root, the shipped corpus, the model cache, a run's work dir, the tracking store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detoxflow.config import Config

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def data_dir() -> Path:
    """The shipped demo corpus (data/ at the project root; overridable for installed copies)."""
    return Path(os.environ.get("DETOXFLOW_DATA_DIR", PROJECT_ROOT / "data"))


def cache_dir() -> Path:
    """Built embedded models, keyed by content hash; shared by all runs of this user."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "detoxflow"
    path = Path(os.environ.get("DETOXFLOW_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def work_dir(configured: str | os.PathLike[str], *, create: bool = True) -> Path:
    """``$DETOXFLOW_WORK_DIR``, else ``configured``, resolved; made when ``create``."""
    path = Path(os.environ.get("DETOXFLOW_WORK_DIR", configured)).resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(cfg: Config | None = None, *, create: bool = True) -> str:
    """``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<work_dir>/mlflow.db`` (with
    ``create=False`` the work dir is not made: for a command that only reads)."""
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg is None:
        from detoxflow.config import Config

        cfg = Config()
    wd = work_dir(cfg.work_dir, create=create)
    return f"sqlite:///{wd / 'mlflow.db'}"

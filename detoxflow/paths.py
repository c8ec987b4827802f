"""Where things live on disk: the project root, the shipped corpus, the model cache, a run's work dir."""

from __future__ import annotations

import os
from pathlib import Path

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


def work_dir(configured: str | os.PathLike[str]) -> Path:
    path = Path(os.environ.get("DETOXFLOW_WORK_DIR", configured)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Where things live: the detoxflow home (state), the project (configs), the shipped corpus, the model cache, a
run's work dir and the tracking store.

State is found, not created where you stand. The home is, in this order: ``--home`` / ``$DETOXFLOW_HOME``; the
nearest ``.detoxflow/`` folder in the working directory or above it; the per-user location
``$XDG_DATA_HOME/detoxflow`` (``~/.local/share/detoxflow``). :func:`find_home` says which rule picked it, so a
command that finds nothing can say where it looked. Configs given by a relative path are looked up in the working
directory, then in the project: the nearest folder above it that holds ``configs/``, then the checkout detoxflow
runs from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from detoxflow.config import Config

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
HOME_ENV = "DETOXFLOW_HOME"
HOME_MARKER = ".detoxflow"


@dataclass(frozen=True)
class Home:
    """The state folder and the rule that picked it (``origin``, for messages)."""

    path: Path
    origin: str

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def user_home(env: Mapping[str, str] | None = None) -> Path:
    """The per-user state folder: ``$XDG_DATA_HOME/detoxflow``, else ``~/.local/share/detoxflow``."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "detoxflow"


def find_home(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Home:
    """``$DETOXFLOW_HOME`` (``--home`` sets it), else the nearest ``.detoxflow/`` in ``cwd`` or above, else
    :func:`user_home`. Creates nothing."""
    env = os.environ if env is None else env
    if env.get(HOME_ENV):
        return Home(Path(env[HOME_ENV]).expanduser().resolve(), f"${HOME_ENV}")
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_MARKER).is_dir():
            return Home(folder / HOME_MARKER, f"the nearest {HOME_MARKER}/ above {here}")
    return Home(user_home(env), f"the per-user default: no {HOME_MARKER}/ in {here} or above it")


def config_candidates(path: Path, cwd: Path | None = None) -> list[Path]:
    """Where a config path is looked for: as given (relative to ``cwd``), then, when relative, under the
    nearest folder above ``cwd`` that holds ``configs/``, then under the checkout detoxflow runs from."""
    here = (cwd or Path.cwd()).resolve()
    given = path.expanduser()
    out = [given if given.is_absolute() else here / given]
    if given.is_absolute():
        return out
    roots = [f for f in (here, *here.parents) if (f / "configs").is_dir()][:1] + [PROJECT_ROOT]
    for root in roots:
        cand = root / given
        if cand not in out:
            out.append(cand)
    return out


def resolve_config(path: Path, cwd: Path | None = None) -> Path:
    """The first of :func:`config_candidates` that is a file; ``path`` itself when none is (the loader names it)."""
    for cand in config_candidates(path, cwd):
        if cand.is_file():
            return cand
    return path


def data_dir() -> Path:
    """The shipped demo corpus (data/ at the project root; overridable for installed copies)."""
    return Path(os.environ.get("DETOXFLOW_DATA_DIR", PROJECT_ROOT / "data"))


def cache_dir() -> Path:
    """Built embedded models, keyed by content hash; shared by all runs of this user."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "detoxflow"
    path = Path(os.environ.get("DETOXFLOW_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def work_dir(configured: str | os.PathLike[str] | None = None, *, create: bool = True) -> Path:
    """``$DETOXFLOW_WORK_DIR``, else ``configured`` (a config's ``work_dir``), else the home (:func:`find_home`),
    resolved; made when ``create``."""
    chosen = os.environ.get("DETOXFLOW_WORK_DIR") or configured
    path = Path(chosen).expanduser().resolve() if chosen else find_home().path
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
    wd = work_dir(cfg.work_dir if cfg is not None else None, create=create)
    return f"sqlite:///{wd / 'mlflow.db'}"

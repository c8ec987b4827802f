"""Checkpoints of a PPO run: what a resumable run writes every ``ppo.checkpoint_every`` steps and reads back.

``out_dir/checkpoints/step-<n>/`` holds ``state.pt`` (step, fingerprint, adapter and value head, optimizer,
scheduler, KL controller, RNG states, history), ``meta.json`` (step, last metrics) and, written last,
``manifest.json`` (each file's size and sha256). The folder is built beside its place, its files and itself
flushed to the disk, then renamed into place; only the ``keep`` newest survive. A checkpoint whose files do not
match its manifest (truncated, missing) is skipped with a warning naming it, and the previous one is used; one
written before manifests existed is trusted as it is. A full disk while saving raises :class:`DiskFullError`
("disk full at <path>") and leaves the previous checkpoint as it was. A checkpoint is resumed only by a run with the same fingerprint
(:func:`run_fingerprint`), and restoring its RNG states makes the resumed run reach the weights an uninterrupted
one would. :class:`TrainingError` is defined here (the trainer re-exports it) because a checkpoint that does not
fit the run is one of its causes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from detoxflow.atomic import atomic_dir, write_bytes
from detoxflow.config import Config
from detoxflow.models import ppo as P

if TYPE_CHECKING:
    from detoxflow.models.policy import Policy

logger = logging.getLogger("detoxflow.models.trainer")  # the name users saw before the split

CHECKPOINT_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite numbers, a checkpoint that does not fit); the message says what to do."""


class DiskFullError(TrainingError):
    """The disk filled up while a checkpoint was written (an environment error: free space, then rerun)."""


class DamagedCheckpointError(TrainingError):
    """A checkpoint file cannot be read and no manifest caught it (an environment error: delete it, rerun)."""


def run_fingerprint(cfg: Config, prompts: Sequence[str], world_size: int = 1) -> str:
    """What a checkpoint must agree with to be resumed: model, adapter, reward, sampling, PPO settings, prompts,
    and the number of processes (it sets the global batch). Step count and checkpoint cadence may change
    between runs (to extend a run)."""
    dump = cfg.model_dump(mode="json")
    ppo = {k: v for k, v in dump["ppo"].items() if k not in ("steps", "checkpoint_every", "keep_checkpoints")}
    payload = {s: dump[s] for s in ("model", "lora", "reward", "generation")} | {"ppo": ppo, "seed": cfg.seed}
    if world_size > 1:  # absent for one process, so single-process checkpoints keep their fingerprint
        payload["world_size"] = world_size
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """This process's torch, Python, CUDA (if any) and numpy RNG states, in a form ``torch.load(weights_only=True)``
    reads back."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be trusted (a file missing, of the wrong size or content), or
    None when it matches its manifest. A folder without a manifest (written before manifests) is judged by the
    presence of ``state.pt`` alone."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return None if (path / CHECKPOINT_FILE).is_file() else f"{CHECKPOINT_FILE} is missing"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, its manifest says {want['size']}"
        if _sha256(f.read_bytes()) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _steps(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-<n>`` folder under ``root`` (temporary folders start with a dot), by step."""
    if not root.is_dir():
        return []
    return sorted((int(p.name[5:]), p) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit())


def latest_checkpoint(root: Path, *, warn: bool = True) -> Path | None:
    """The intact checkpoint with the highest step under ``root``; a damaged newer one is skipped with one
    warning naming it (``warn=False``: silently, for a caller that only looks)."""
    for _, path in reversed(_steps(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            logger.warning("skipping damaged checkpoint %s: %s; using the previous one", path, problem)
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    root: Path,
    step: int,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    kl_ctl: P.AdaptiveKLController | P.FixedKLController,
    history: list[dict[str, float]],
    fingerprint: str,
    keep: int,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``root/step-<step>`` atomically (temp folder + rename), then drop all but the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"step-{step}"
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "trainable": policy.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "kl_controller": kl_ctl.state_dict(),
        "rng": rng_state(),
        "history": history,
    }
    if rng_states is not None:
        state["rng_ranks"] = rng_states
    # serialised in memory, then written with plain writes: a full disk is an OSError(ENOSPC) we can name,
    # not torch's "unexpected pos" from inside its zip writer
    buf = io.BytesIO()
    torch.save(state, buf)
    contents = {
        CHECKPOINT_FILE: buf.getvalue(),
        "meta.json": json.dumps({"step": step, "metrics": history[-1] if history else {}}, indent=2).encode(),
    }
    try:
        with atomic_dir(dest, fsync=True) as tmp:
            for name, data in contents.items():
                write_bytes(tmp / name, data)
            manifest = {"step": step, "files": {n: {"size": len(d), "sha256": _sha256(d)} for n, d in contents.items()}}
            write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())  # last: it vouches for the rest
    except OSError as e:
        if e.errno == errno.ENOSPC:
            previous = latest_checkpoint(root, warn=False)
            kept = f"the last good checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise DiskFullError(f"disk full at {dest}: free space there and rerun to resume ({kept})") from None
        raise
    for _, old in _steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", dest)
    return dest


def load_checkpoint(
    path: Path,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    kl_ctl: P.AdaptiveKLController | P.FixedKLController,
    fingerprint: str,
    rank: int = 0,
) -> tuple[int, list[dict[str, float]]]:
    """Restore everything :func:`save_checkpoint` wrote; returns (step, history)."""
    try:
        state = torch.load(path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a damaged checkpoint written before manifests
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(
            f"{path / CHECKPOINT_FILE} cannot be read ({first}); delete {path} to resume from the checkpoint before it"
        ) from None
    if state["fingerprint"] != fingerprint:
        raise TrainingError(
            f"{path}: this checkpoint was written with other model/lora/reward/generation/ppo settings or prompts; "
            f"resume with the same config, or start over with resume=False or a new output folder"
        )
    policy.load_trainable_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_controller"])
    set_rng_state(state["rng_ranks"][rank] if "rng_ranks" in state else state["rng"])
    return int(state["step"]), list(state["history"])

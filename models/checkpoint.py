"""Checkpoints of a PPO run: what a resumable run writes every ``ppo.checkpoint_every`` steps and reads back.

``out_dir/checkpoints/step-<n>/`` holds ``state.pt`` (step, fingerprint, adapter and value head, optimizer,
scheduler, KL controller, RNG states, history) and ``meta.json`` (step, last metrics), written atomically; only
the ``keep`` newest survive. A checkpoint is resumed only by a run with the same fingerprint
(:func:`run_fingerprint`), and restoring its RNG states makes the resumed run reach the weights an uninterrupted
one would. :class:`TrainingError` is defined here (the trainer re-exports it) because a checkpoint that does not
fit the run is one of its causes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from detoxflow.atomic import atomic_dir
from detoxflow.config import Config
from detoxflow.models import ppo as P

if TYPE_CHECKING:
    from detoxflow.models.policy import Policy

logger = logging.getLogger("detoxflow.models.trainer")  # the name users saw before the split

CHECKPOINT_FILE = "state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite numbers, a checkpoint that does not fit); the message says what to do."""


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


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (temporary folders are never complete)."""
    if not root.is_dir():
        return None
    found = [(int(p.name.split("-", 1)[1]), p) for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / CHECKPOINT_FILE).is_file()]
    return max(found)[1] if found else None


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
    with atomic_dir(dest) as tmp:
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
        torch.save(state, tmp / CHECKPOINT_FILE)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "metrics": history[-1] if history else {}}, indent=2))
    steps = sorted((int(p.name[5:]), p) for p in root.iterdir() if p.is_dir() and p.name[:5] == "step-" and p.name[5:].isdigit())
    for _, old in steps[:-keep]:
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
    state = torch.load(path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
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

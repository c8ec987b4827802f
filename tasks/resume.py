"""Resuming a command from the command line: ``detoxflow run`` and ``detoxflow train`` find their own unfinished
run and continue it from its newest intact checkpoint.

A run is tagged with its command's fingerprint (:func:`resume_key`: the command, :meth:`Config.digest` and the
digests of the data splits it reads). ``with resumable(cfg, "train") as plan:`` holds a lock on that
fingerprint in the work dir for the command's life (a second command says who holds it: host, pid, run id),
then picks the newest unfinished run of the fingerprint. A run is alive while its heartbeat lease (renewed by
the training loop's step logging, :class:`detoxflow.tracking.Heartbeat`) has not run out, wherever it runs;
an alive run is never resumed. ``fresh=True`` starts a new run and marks the unfinished ones that are not
alive FAILED with the reason (they are then never resumed); ``run_id`` names the run to resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.locks import LockHeld, command_lock, update_holder
from detoxflow.models.checkpoint import latest_checkpoint
from detoxflow.models.data import load_split, split_digest
from detoxflow.paths import work_dir
from detoxflow.tasks.training import train_dir

Command = Literal["train", "pipeline"]


@dataclass(frozen=True)
class ResumePlan:
    """What the command does: continue ``run_id`` (None: a new run) tagged ``key``; ``message`` says so."""

    key: str
    run_id: str | None
    message: str | None


def resume_key(cfg: Config, command: Command) -> str:
    """The fingerprint of a command: which command, the config digest and the digests of the splits it reads
    (the training split; the pipeline also its evaluation split)."""
    splits = [cfg.data.train_split] + ([cfg.data.eval_split] if command == "pipeline" else [])
    digests = {s: split_digest(load_split(cfg.data, s)) for s in splits}
    payload = {"command": command, "config": cfg.digest(), "data": digests}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _age(run: tracking.UnfinishedRun, now: float) -> str:
    holder = run.holder
    where = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    return f"{where}; its lease runs {run.lease_until - now:.0f} s more"


@contextlib.contextmanager
def resumable(
    cfg: Config, command: Command, *, fresh: bool = False, run_id: str | None = None
) -> Iterator[ResumePlan]:
    """Hold the fingerprint's lock for the body and yield the :class:`ResumePlan`; raise
    :class:`tracking.ResumeError` when the run to resume is alive, unknown, or another command holds the lock."""
    key = resume_key(cfg, command)
    me = tracking.lease_holder(cfg)
    lock_path = work_dir(cfg.work_dir) / "locks" / f"{command}-{key}.lock"
    try:
        with command_lock(lock_path, {**me, "fingerprint": key}) as holder:
            plan = _plan(cfg, command, key, me, fresh=fresh, run_id=run_id)
            if plan.run_id is not None:
                update_holder(lock_path, {**holder, "run_id": plan.run_id})
            yield plan
    except LockHeld as e:
        raise tracking.ResumeError(
            f"another detoxflow {command} with this config and data is running ({str(e)}); wait for it to end, "
            "or change the config or work_dir to run beside it"
        ) from None


def _plan(cfg: Config, command: Command, key: str, me: dict[str, object], *, fresh: bool,
          run_id: str | None) -> ResumePlan:
    now = time.time()
    runs = tracking.unfinished_runs(cfg, key)
    if run_id is not None:
        chosen = next((r for r in runs if r.run_id == run_id), None)
        if chosen is None:
            raise tracking.ResumeError(
                f"--resume {run_id}: no unfinished {command} run with this id, config and data in experiment "
                f"'{cfg.tracking.experiment}'. Run with the config it was started with, or drop --resume"
            )
        runs = [chosen]
    elif fresh:
        for r in runs:
            if not r.alive(me, now):
                tracking.mark_abandoned(r.run_id, f"abandoned: a new run was started with --fresh at {now:.0f}")
        return ResumePlan(key, None, None)
    if not runs:
        return ResumePlan(key, None, None)
    run = runs[0]
    if run.alive(me, now):
        raise tracking.ResumeError(
            f"run {run.run_id} with this config and data is still alive ({_age(run, now)}); it is not resumed. "
            "Wait for it, or pass --fresh to start another run beside it"
        )
    latest = latest_checkpoint(train_dir(cfg, run.run_id) / "checkpoints", warn=False)
    step = int(latest.name[5:]) if latest is not None else 0
    return ResumePlan(key, run.run_id, f"resuming run {run.run_id} from step {step} of {cfg.ppo.steps}")

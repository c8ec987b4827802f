"""Keep the mutants of the trainer's reward/loss code, skip the trainer's other mutants (I/O, logging, loop).

Usage: ``python tests/mutation/scope.py SESSION.sqlite TRAINER.py`` after ``cosmic-ray init``. In the trainer,
the reward/loss code is ``ppo_step`` from its step 5 (per-token KL) up to step 10 (metrics), and ``ppo_update``
from the training forward to the optimizer step; the ranges are found from those markers on every run, so the
scope follows edits of the file. Every mutant of the other modules in the session (models/ppo.py) is kept.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

MARKERS = {"ppo_step": ("# 5.", "# 10."), "ppo_update": ("policy.forward(", "optimizer.step()")}


def scoped_lines(source: str) -> list[tuple[int, int]]:
    """1-based inclusive line ranges of the reward/loss code of the trainer's source."""
    lines = source.splitlines()
    funcs = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    ranges = []
    for name, (first, last) in MARKERS.items():
        if name not in funcs:
            raise SystemExit(f"scope.py: the trainer has no function {name}; update MARKERS in {__file__}")
        f = funcs[name]
        body = range(f.lineno, f.end_lineno + 1)
        start = next((i for i in body if first in lines[i - 1]), None)
        end = next((i for i in body if last in lines[i - 1] and start is not None and i > start), None)
        if start is None or end is None:
            raise SystemExit(f"scope.py: markers {first!r} .. {last!r} not found in {name}; update MARKERS")
        ranges.append((start, end))
    return ranges


def skip_outside(db: WorkDB, trainer: Path) -> tuple[int, int]:
    """Mark the trainer's mutants outside :func:`scoped_lines` skipped; ``-> (kept, skipped)`` of the trainer."""
    ranges = scoped_lines(trainer.read_text())
    skip, kept = [], 0
    for item in db.pending_work_items:
        mutation = item.mutations[0]
        if Path(mutation.module_path).name != trainer.name:
            continue
        line = mutation.start_pos[0]
        if any(a <= line <= b for a, b in ranges):
            kept += 1
        else:
            skip.append(item.job_id)
    if skip:
        db.set_multiple_results(skip, WorkResult(output="outside the reward/loss code",
                                                 worker_outcome=WorkerOutcome.SKIPPED))
    return kept, len(skip)


if __name__ == "__main__":
    session, trainer_path = sys.argv[1], Path(sys.argv[2])
    with use_db(session) as work_db:
        kept, skipped = skip_outside(work_db, trainer_path)
    print(f"trainer mutants: {kept} in the reward/loss code, {skipped} skipped", file=sys.stderr)

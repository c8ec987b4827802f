"""The fault-injection aid the reliability tests rely on: it kills exactly at the named point, and only there."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
from detoxflow.faults import fault_point
print("before", flush=True)
fault_point("register")
fault_point("checkpoint", 5)
print("c5", flush=True)
fault_point("checkpoint", 10)
print("after", flush=True)
"""


def _run(spec: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DETOXFLOW_FAULT"}
    if spec is not None:
        env["DETOXFLOW_FAULT"] = spec
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)


def test_unset_or_unmatched_fault_does_nothing():
    for spec in (None, "", "after:gate", "after:checkpoint:7", "before:register"):
        proc = _run(spec)
        assert proc.returncode == 0 and proc.stdout.split() == ["before", "c5", "after"], spec


def test_named_point_exits_137_at_once():
    proc = _run("after:register")
    assert proc.returncode == 137 and proc.stdout.split() == ["before"]


def test_detail_selects_one_occurrence_and_lists_combine():
    tenth = _run("after:checkpoint:10")
    assert tenth.returncode == 137 and tenth.stdout.split() == ["before", "c5"]
    first = _run("after:checkpoint")  # no detail: the first checkpoint
    assert first.returncode == 137 and first.stdout.split() == ["before"]
    both = _run("after:gate, after:checkpoint:5")
    assert both.returncode == 137 and both.stdout.split() == ["before"]

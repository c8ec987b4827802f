"""Reliability gaps of issue 17 (docs/reliability.md): the rank processes of `detoxflow train --num-processes 2`
die with the command (item 2).

The processes a command started are found by a marker in their environment (inherited by every descendant), not
by name; the kill lands once both ranks have joined their process group (read from the ranks' log), not at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
MARKER = "DETOXFLOW_TEST_MARKER"
TWO_RANKS = [
    "ppo.steps=50", "ppo.checkpoint_every=50", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
    "generation.max_new_tokens=8", "data.max_train_samples=16", "data.max_eval_samples=8", "model.num_threads=1",
    "model.device=cpu",
]


@pytest.fixture(scope="module")
def prefect_api(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def marked(value: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``MARKER=value``: the command and its descendants."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
    return sorted(found)


def left_after(value: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := marked(value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def start_two_rank_train(work: Path, api: str, marker: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DETOXFLOW_FAULT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env |= {"PREFECT_API_URL": api, MARKER: marker}
    work.mkdir(parents=True, exist_ok=True)
    sets = [a for s in (*TWO_RANKS, f"work_dir={work}") for a in ("--set", s)]
    cmd = [sys.executable, "-m", "detoxflow.cli", "train", "--num-processes", "2",
           "-c", str(PROJECT / "configs" / "default.yaml"), *sets]
    with (work / "command.log").open("wb") as fh:
        return subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)


def wait_for_ranks(proc: subprocess.Popen[bytes], work: Path) -> None:
    """Until both ranks have joined their process group (both rank processes exist and train)."""
    deadline = time.monotonic() + 600
    while True:
        logs = list(work.rglob("ranks.log"))
        text = logs[0].read_text(errors="replace") if logs else ""
        if all(f"rank {r} of 2 joined the process group" in text for r in (0, 1)):
            return
        assert proc.poll() is None, (work / "command.log").read_text(errors="replace")[-3000:] + text[-3000:]
        assert time.monotonic() < deadline, "the ranks did not start within 600 s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "term", "int"])
def test_rank_processes_die_with_the_command(tmp_path, prefect_api, sig):
    """Item 2: `detoxflow train --num-processes 2` killed (or sent SIGTERM / SIGINT) while its two ranks train:
    10 s later no process it started (launcher, ranks) is left."""
    marker = uuid.uuid4().hex
    work = tmp_path / "w"
    proc = start_two_rank_train(work, prefect_api, marker)
    try:
        wait_for_ranks(proc, work)
        assert len(marked(marker)) >= 4  # the command, the launcher and two ranks
        proc.send_signal(sig)
        proc.wait(timeout=60)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:300] for p in left_after(marker, 10)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in marked(marker):  # clean up after a failure: only the processes this test started
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert left == {}

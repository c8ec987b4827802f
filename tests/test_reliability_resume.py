"""Reliability: checkpoints that prove themselves, and a killed `detoxflow train` / `run` that resumes from the
command line (issue 17, rows 1, 2 and 9 of its table; docs/reliability.md).

Kills land at named points (``DETOXFLOW_FAULT=after:<point>``, detoxflow/faults.py), never by timing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_trainer import fresh_policy
from test_trainer import trainable_snapshot as weights

from detoxflow.config import Config, load_config
from detoxflow.models import checkpoint as ckpt
from detoxflow.models.reward import ScoreResult
from detoxflow.models.trainer import train

PROMPTS = [f"person one says the order {i} arrived late and the manager {w}" for i, w in
           enumerate(["agrees", "says thanks", "asks", "tells the doctor", "wants a refund", "is lovely"])]


class WordScorer:
    """Stand-in reward: toxicity = share of words that are insults."""

    name = "word-stub"

    def score(self, texts):
        tox = torch.tensor([sum(w in ("idiot", "stupid") for w in t.split()) / max(len(t.split()), 1) for t in texts])
        return ScoreResult(1.0 - tox, tox)


def make_cfg(tiny_models: dict[str, Path], *overrides: str) -> Config:
    return load_config(None, [
        f"model.name_or_path={tiny_models['gpt2']}", "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.learning_rate=0.01", "ppo.ppo_epochs=1",
        "ppo.target_approx_kl=null", *overrides,
    ])




def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------- item 3: checkpoints


def test_checkpoint_has_a_manifest_written_last_and_is_flushed_before_the_rename(tiny_models, tmp_path, monkeypatch):
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    cfg = make_cfg(tiny_models, "ppo.steps=1")
    train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path, lambda m, s: None)
    step = tmp_path / "checkpoints" / "step-1"
    manifest = json.loads((step / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["meta.json", "state.pt"]
    for name, entry in manifest["files"].items():
        assert entry == {"size": (step / name).stat().st_size, "sha256": sha(step / name)}
    # every file and the folder reached the disk under the temporary name, then the parent (the rename)
    tmp_names = [p for p in flushed if "/.step-1.tmp-" in p]
    assert {Path(p).name for p in tmp_names} >= {"state.pt", "meta.json", "manifest.json"}
    assert any(Path(p).name.startswith(".step-1.tmp-") for p in tmp_names)  # the folder itself
    assert str(tmp_path / "checkpoints") in flushed[flushed.index(tmp_names[-1]):]


def test_truncated_newest_checkpoint_is_skipped_with_one_warning(tiny_models, tmp_path, caplog):
    """Row 2: the newest checkpoint's state.pt truncated; resuming uses the previous one and ends with the
    weights an uninterrupted run reaches."""
    cfg = make_cfg(tiny_models, "ppo.steps=3", "ppo.checkpoint_every=1")
    straight = fresh_policy(cfg)
    train(cfg, straight, WordScorer(), PROMPTS, tmp_path / "straight", lambda m, s: None)

    run = tmp_path / "run"
    train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, run, lambda m, s: None)
    damaged = run / "checkpoints" / "step-3"
    state = damaged / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    steps: list[int] = []
    resumed = fresh_policy(cfg)
    with caplog.at_level(logging.WARNING):
        train(cfg, resumed, WordScorer(), PROMPTS, run, lambda m, s: steps.append(s))
    assert steps == [3]  # resumed from step-2, trained step 3 again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and str(damaged) in warnings[0], warnings
    assert max_abs_diff(weights(straight), weights(resumed)) == 0.0
    assert ckpt.checkpoint_problem(damaged) is None  # step 3 was written again, whole


def test_missing_file_and_checkpoints_without_a_manifest(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models, "ppo.steps=2", "ppo.checkpoint_every=1")
    train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path, lambda m, s: None)
    root = tmp_path / "checkpoints"
    (root / "step-2" / "meta.json").unlink()
    assert ckpt.checkpoint_problem(root / "step-2") == "meta.json is missing"
    assert ckpt.latest_checkpoint(root) == root / "step-1"
    # a checkpoint written before manifests existed still loads: extend the run from it
    (root / "step-1" / "manifest.json").unlink()
    longer = make_cfg(tiny_models, "ppo.steps=3", "ppo.checkpoint_every=1")
    steps: list[int] = []
    train(longer, fresh_policy(longer), WordScorer(), PROMPTS, tmp_path, lambda m, s: steps.append(s))
    assert steps == [2, 3]


def test_disk_full_while_saving_names_the_path_and_keeps_the_last_good_checkpoint(tiny_models, tmp_path, monkeypatch):
    """Row 9: the disk fills up half-way through writing step-2's state.pt."""
    cfg = make_cfg(tiny_models, "ppo.steps=3", "ppo.checkpoint_every=1")
    root = tmp_path / "checkpoints"
    real_write = os.write

    def filling_write(fd: int, data) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "/.step-2.tmp-" in target and target.endswith("state.pt"):
            if os.fstat(fd).st_size > 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, bytes(data[: len(data) // 2]))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    good = None
    with pytest.raises(ckpt.DiskFullError) as info:
        train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path, lambda m, s: None)
    message = str(info.value)
    assert message.startswith(f"disk full at {root / 'step-2'}") and "\n" not in message
    assert isinstance(info.value, ckpt.TrainingError)
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # no half-written folder left behind
    good = sha(root / "step-1" / "state.pt")
    monkeypatch.setattr(os, "write", real_write)
    steps: list[int] = []
    train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path, lambda m, s: steps.append(s))
    assert steps == [2, 3] and good is not None


# --------------------------------------------------------------------------- item 1: resume from the CLI

PROJECT = Path(__file__).resolve().parent.parent
SMALL = [
    "ppo.steps=5", "ppo.checkpoint_every=2", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
    "generation.max_new_tokens=8", "data.max_train_samples=16", "data.max_eval_samples=8", "model.num_threads=1",
    "eval.k_samples=1", "eval.bootstrap_samples=100",
]


@pytest.fixture(scope="module")
def prefect_api(prefect_harness) -> str:
    """The session's Prefect API, shared by the CLI subprocesses (each would otherwise start its own server)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def detoxflow(command: str, work: Path, api: str, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``detoxflow <command>`` on the embedded default with a few small steps, in ``work`` (its own work dir and
    SQLite store)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DETOXFLOW_FAULT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env |= {"DETOXFLOW_LEASE_S": "600"} | ({"PREFECT_API_URL": api} if api else {})
    if fault:
        env["DETOXFLOW_FAULT"] = fault
    sets = [a for s in (*SMALL, f"work_dir={work}") for a in ("--set", s)]
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "detoxflow.cli", command, "-c", str(PROJECT / "configs" / "default.yaml"), *sets, *extra]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def error_message(stderr: str) -> str:
    """The CLI's error message (the console may wrap it to the terminal's width), as one line."""
    return " ".join(stderr[stderr.rindex("error:"):].split())


def store(work: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{work / 'mlflow.db'}")


def all_runs(work: Path) -> list:
    cli = store(work)
    return cli.search_runs([e.experiment_id for e in cli.search_experiments()])


def adapter(work: Path, run_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(work / "runs" / run_id / "train" / "model" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_killed_train_resumes_from_the_command_line(tmp_path, prefect_api):
    """Row 1: `detoxflow train` killed after step 3 (checkpoint step-2 on disk), then the same command again."""
    straight = detoxflow("train", tmp_path / "straight", prefect_api, "--json")
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_id = json.loads(straight.stdout)["run_id"]

    work = tmp_path / "killed"
    killed = detoxflow("train", work, prefect_api, fault="after:step:3")
    assert killed.returncode == 137, killed.stderr[-3000:]
    (run,) = all_runs(work)
    assert run.info.status == "RUNNING"
    assert sorted(m.step for m in store(work).get_metric_history(run.info.run_id, "objective/scores")) == [1, 2, 3]

    again = detoxflow("train", work, prefect_api, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming run {run.info.run_id} from step 2 of 5" in again.stderr.splitlines()
    assert json.loads(again.stdout)["run_id"] == run.info.run_id
    (done,) = all_runs(work)  # one run, finished, every step logged once
    assert done.info.run_id == run.info.run_id and done.info.status == "FINISHED"
    for key in ("objective/scores", "objective/kl", "loss/policy"):
        assert sorted(m.step for m in store(work).get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4, 5], key
    assert max_abs_diff(adapter(tmp_path / "straight", straight_id), adapter(work, run.info.run_id)) == 0.0


@pytest.mark.slow
def test_alive_lease_lock_and_fresh(tmp_path, prefect_api):
    """A run alive on another host is not resumed; a second command on a held lock says who holds it; --fresh
    starts over and marks the abandoned run FAILED with the reason."""
    from detoxflow.locks import command_lock
    from detoxflow.tracking import TAG_ABANDONED, TAG_LEASE_HOLDER, TAG_LEASE_UNTIL

    work = tmp_path / "w"
    killed = detoxflow("train", work, prefect_api, fault="after:checkpoint:2")
    assert killed.returncode == 137, killed.stderr[-3000:]
    (run,) = all_runs(work)
    rid = run.info.run_id
    # as if that run were training on another machine right now: its lease (600 s) has not run out
    store(work).set_tag(rid, TAG_LEASE_HOLDER, json.dumps({"host": "gpu-7", "pid": 4242, "work_dir": "/elsewhere"}))
    alive = detoxflow("train", work, prefect_api)
    assert alive.returncode == 2, alive.stderr[-3000:]
    last = error_message(alive.stderr)
    assert f"run {rid}" in last and "alive" in last and "gpu-7" in last and "Traceback" not in alive.stderr
    assert [(r.info.run_id, r.info.status) for r in all_runs(work)] == [(rid, "RUNNING")]

    (lock_path,) = (work / "locks").glob("train-*.lock")
    with command_lock(lock_path, {"host": "this-host", "pid": os.getpid(), "run_id": "r-123"}):
        held = detoxflow("train", work, prefect_api)
    assert held.returncode == 2, held.stderr[-3000:]
    last = error_message(held.stderr)
    assert f"pid {os.getpid()}" in last and "this-host" in last and "r-123" in last

    store(work).set_tag(rid, TAG_LEASE_UNTIL, "1")  # the other machine died: its lease ran out long ago
    fresh = detoxflow("train", work, prefect_api, "--fresh", "--json")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stderr
    runs = {r.info.run_id: r for r in all_runs(work)}
    new_id = json.loads(fresh.stdout)["run_id"]
    assert set(runs) == {rid, new_id} and runs[new_id].info.status == "FINISHED"
    assert runs[rid].info.status == "FAILED" and runs[rid].data.tags[TAG_ABANDONED].startswith("abandoned")


def test_lease_liveness_is_the_heartbeat_not_the_pid():
    from detoxflow.tracking import UnfinishedRun

    me = {"host": "a", "pid": 1, "work_dir": "/w"}
    other = {"host": "b", "pid": 1, "work_dir": "/w"}
    assert UnfinishedRun("r", "RUNNING", 200.0, other).alive(me, now=100.0)
    assert not UnfinishedRun("r", "RUNNING", 50.0, other).alive(me, now=100.0)  # lease ran out
    assert not UnfinishedRun("r", "FAILED", 200.0, other).alive(me, now=100.0)  # ended
    # the holder was this host and work dir, whose lock the caller now holds: it is gone, whatever its lease says
    assert not UnfinishedRun("r", "RUNNING", 200.0, {**me, "pid": 999}).alive(me, now=100.0)


@pytest.mark.slow
def test_killed_pipeline_resumes_from_the_command_line(tmp_path, prefect_api):
    """Row 1 for `detoxflow run`: killed in training after step 3, then the same command again."""
    work = tmp_path / "p"
    killed = detoxflow("run", work, prefect_api, fault="after:step:3")
    assert killed.returncode == 137, killed.stderr[-3000:]
    (parent,) = [r for r in all_runs(work) if "mlflow.parentRunId" not in r.data.tags]

    again = detoxflow("run", work, prefect_api, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming run {parent.info.run_id} from step 2 of 5" in again.stderr.splitlines()
    runs = all_runs(work)
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent.info.run_id]
    assert {r.info.status for r in runs} == {"FINISHED"}  # the parent and every stage's run
    stages = sorted(r.data.tags.get("detoxflow.stage") for r in runs if "mlflow.parentRunId" in r.data.tags)
    # one child run per stage: the stages served from Prefect's cache reuse their finished runs
    assert stages == ["baseline", "evaluate", "gate", "prepare", "train"], stages
    (train_run,) = [r for r in runs if r.data.tags.get("detoxflow.stage") == "train"]
    steps = sorted(m.step for m in store(work).get_metric_history(train_run.info.run_id, "objective/scores"))
    assert steps == [1, 2, 3, 4, 5]
    summary = json.loads(again.stdout)
    assert summary["mlflow"]["parent_run_id"] == parent.info.run_id


# --------------------------------------------------------------------------------- item 2: no orphans

PR_SET_CHILD_SUBREAPER = 36


def _orphans_of_mine() -> list[int]:
    """Live processes whose parent is this (subreaper) process: what a dead child left behind. Zombies are reaped."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid() and fields[0] != "Z":
                    found.append(int(entry.name))
    return found


@pytest.fixture
def subreaper():
    """Make this process the subreaper of its descendants, so the orphans of a killed command become its children."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available")
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _none_left_within(seconds: float, before: set[int]) -> list[int]:
    """The processes (other than ``before``, e.g. this session's own Prefect server) still our children."""
    deadline = time.monotonic() + seconds
    left = set(_orphans_of_mine()) - before
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = set(_orphans_of_mine()) - before
    return sorted(left)


def _start_train(work: Path, log: Path, fault: str | None = None) -> subprocess.Popen[bytes]:
    """`detoxflow train` with no PREFECT_API_URL (it starts a server of its own); output to ``log``, not to a
    pipe, which an orphan would hold open."""
    env = {k: v for k, v in os.environ.items() if k not in ("DETOXFLOW_FAULT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    if fault:
        env["DETOXFLOW_FAULT"] = fault
    work.mkdir(parents=True, exist_ok=True)
    sets = [a for s in (*SMALL, f"work_dir={work}") for a in ("--set", s)]
    # -v: the trainer's INFO lines (": checkpoint /...") are what the test waits for; the default console hides them
    cmd = [sys.executable, "-m", "detoxflow.cli", "-v", "train", "-c", str(PROJECT / "configs" / "default.yaml"), *sets]
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)


@pytest.mark.slow
def test_no_child_outlives_a_killed_or_terminated_command(tmp_path, subreaper):
    """Item 2: `detoxflow train` starts its own Prefect API server (no PREFECT_API_URL); killed with -9 at a named
    point, or sent SIGTERM once its first checkpoint is written, it leaves no process behind 10 s later."""
    before = set(_orphans_of_mine())  # children this test session had already (a Prefect test server)
    killed = _start_train(tmp_path / "k", tmp_path / "k.log", fault="after:step:1")
    assert killed.wait(timeout=900) == 137, (tmp_path / "k.log").read_text()[-3000:]
    assert _none_left_within(10, before) == []

    log = tmp_path / "t.log"
    proc = _start_train(tmp_path / "t", log)
    try:
        deadline = time.monotonic() + 900
        # the point: the first checkpoint is on disk (the server is up, training runs)
        while ": checkpoint /" not in log.read_text(errors="replace"):  # the trainer logs each checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _none_left_within(10, before) == []

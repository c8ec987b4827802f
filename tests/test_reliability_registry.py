"""Registry writes that end consistent (issue 17, item 4): a register or gate killed at any write leaves a state
the next attempt for the same training run detects and finishes.

Each test kills the real write path (``register_model`` then ``gate_and_promote`` of :mod:`detoxflow.tasks.registry`,
as the pipeline calls them) in a subprocess at a named point with ``DETOXFLOW_FAULT=after:<point>`` (exit 137, as
``kill -9``), runs the same call again, and checks the registry against what the promotion rules say an
uninterrupted run writes: one version for the training run, ``challenger`` on it, ``champion`` where the decision
says, the decision and reasons tags equal to :func:`detoxflow.models.promotion.decide`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from servers import migrated_sqlite_store

from detoxflow.config import Config
from detoxflow.models.promotion import decide

mlflow = pytest.importorskip("mlflow")
from detoxflow import tracking as T  # noqa: E402

NAME = "unit"
SPLIT, SETTINGS = "5p1i75p1i7000001", "5e771n95e7710001"
BASELINE = {"eval/toxicity_mean": 0.50, "eval/rouge_l": 0.30, "eval/length_mean": 20.0}
KL = 1.0
CHAMPION_TOX = 0.30  # version 1, promoted before the test starts
BETTER_TOX = 0.20  # beats the champion: the gate promotes it
WORSE_TOX = 0.40  # does not beat the champion: the gate rejects it

# The pipeline's tail (flows/pipeline.py: register, then gate) on the training run argv[2], with the challenger's
# toxicity argv[3]; the Prefect task functions are called directly (.fn). With a fault argv[4], a forked child runs
# it first under DETOXFLOW_FAULT (the imports, most of the time, are done once); the registry as the kill left it
# and the child's exit status are printed, then this process runs the same call again: the retry.
DRIVER = f"""
import json, os, sys
from detoxflow import tracking
from detoxflow.config import Config
from detoxflow.tasks.registry import gate_and_promote, register_model
work, run_id, tox = sys.argv[1], sys.argv[2], float(sys.argv[3])
fault = sys.argv[4] if len(sys.argv) > 4 else None
cfg = Config(name={NAME!r}, work_dir=work)
base = {{"metrics": {BASELINE!r}, "split_digest": {SPLIT!r}, "settings_digest": {SETTINGS!r}}}
ev = {{"metrics": {{**base["metrics"], "eval/toxicity_mean": tox}}, "split_digest": {SPLIT!r},
      "settings_digest": {SETTINGS!r}, "alarms": []}}
train = {{"run_id": run_id, "summary": {{"train/kl_mean": {KL!r}}}}}

def tail():
    registered = register_model.fn(cfg, run_id, ev, train)
    return gate_and_promote.fn(cfg, registered["version"], ev, base, train, {{}})

if fault:
    pid = os.fork()
    if pid == 0:
        os.environ["DETOXFLOW_FAULT"] = fault
        tail()
        os._exit(0)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    tracking.setup(cfg)
    name = cfg.registered_model_name
    alias = lambda a: (tracking.get_alias(name, a) or tracking.VersionInfo(name, "", None, "")).version or None
    mine = [v for v in tracking.list_versions(name) if v.run_id == run_id]
    print("KILLED " + json.dumps({{"status": status, "versions": [v.version for v in mine],
          "challenger": alias(tracking.CHALLENGER), "champion": alias(tracking.CHAMPION),
          "tags": {{k: v for k, v in (mine[0].tags if mine else {{}}).items()
                   if k.startswith("promotion.") or k == "decision"}}}}))
    sys.stdout.flush()
print("RESULT " + json.dumps(tail()))
"""


def policy_dir(tiny_models: dict[str, Path], dest: Path) -> Path:
    """A real saved policy (tiny random T5 + LoRA), as training leaves it: what the run logs as its model."""
    import torch

    from detoxflow.config import LoraSection, ModelConfig
    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models["t5"]), device="cpu"), LoraSection(r=4))
    return policy.save_artifact(dest)


def _metrics(tox: float) -> dict[str, Any]:
    return {**BASELINE, "eval/toxicity_mean": tox, "train/kl_mean": KL, "split_digest": SPLIT,
            "settings_digest": SETTINGS}


def expected_tags(tox: float, champion_before: str) -> dict[str, str]:
    """The decision tags an uninterrupted gate writes, from the promotion rules themselves."""
    base = {**BASELINE, "split_digest": SPLIT, "settings_digest": SETTINGS}
    champ = _metrics(CHAMPION_TOX) if champion_before != "none" else None
    cfg = Config(name=NAME)
    decision = decide(_metrics(tox), champ, base, cfg.promotion, cfg.ppo.kl.target, [])
    return {**decision.as_tags(), "promotion.champion_before": champion_before,
            "promotion.champion_metrics": "registered" if champ else "none"}


def _env(cache: Path, fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", "DETOXFLOW_LOCK_DB_URI", "MLFLOW_RUN_ID",
                        "DETOXFLOW_FAULT")}
    env["DETOXFLOW_CACHE"] = str(cache)
    if fault:
        env["DETOXFLOW_FAULT"] = fault
    return env


def run_tail(work: Path, run_id: str, tox: float, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """Register + gate the training run in a fresh process; with ``fault``, killed there first, then retried."""
    return subprocess.run([sys.executable, "-c", DRIVER, str(work), run_id, str(tox), *([fault] if fault else [])],
                          env=_env(work / "cache"), capture_output=True, text=True, timeout=300)


def _printed(proc: subprocess.CompletedProcess[str], label: str) -> dict[str, Any]:
    lines = [x for x in proc.stdout.splitlines() if x.startswith(f"{label} ")]
    assert lines, f"no {label} line; exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len(label) + 1:])


def gate_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The gate's result printed by the (last) uninterrupted call."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _printed(proc, "RESULT")


def killed_state(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The killed attempt's exit status and the registry as it left it."""
    return _printed(proc, "KILLED")


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_models) -> dict[str, Any]:
    """A store where version 1 (training run A) is champion and training run B has a model, not yet registered."""
    root = tmp_path_factory.mktemp("registry-template")
    work = root / "work"
    work.mkdir()
    migrated_sqlite_store(work / "mlflow.db")
    saved = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID") if k in os.environ}
    try:
        cfg = Config(name=NAME, work_dir=str(work))
        runs = {}
        with T.parent_run(cfg, "pipeline"):
            for label in ("A", "B"):
                model = policy_dir(tiny_models, root / f"model-{label}")
                with T.child_run(f"train_{label}") as run_id:
                    T.log_model_dir(model)
                runs[label] = run_id
    finally:
        os.environ.update(saved)
    first = gate_result(run_tail(work, runs["A"], CHAMPION_TOX))
    assert (first["version"], first["decision"]) == ("1", "promoted")
    return {"work": work, "runs": runs, "tiny": tiny_models}


@pytest.fixture
def store(template, tmp_path, monkeypatch) -> dict[str, Any]:
    """A private copy of the template store (the artifacts stay in the template's folder, read only)."""
    for var in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", "DETOXFLOW_LOCK_DB_URI", "MLFLOW_RUN_ID",
                "DETOXFLOW_FAULT"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(template["work"] / "mlflow.db", work / "mlflow.db")
    cfg = Config(name=NAME, work_dir=str(work))
    return {"work": work, "cfg": cfg, "runs": template["runs"], "tiny": template["tiny"]}


def registry_state(cfg: Config, run_id: str) -> dict[str, Any]:
    T.setup(cfg)
    name = cfg.registered_model_name
    mine = [v for v in T.list_versions(name) if v.run_id == run_id]
    challenger, champion = T.get_alias(name, T.CHALLENGER), T.get_alias(name, T.CHAMPION)
    return {
        "versions": [v.version for v in mine],
        "challenger": challenger.version if challenger else None,
        "champion": champion.version if champion else None,
        "tags": {k: v for k, v in mine[0].tags.items() if k.startswith("promotion.") or k == "decision"} if mine else {},
    }


def assert_consistent(state: dict[str, Any], tox: float) -> None:
    want = expected_tags(tox, champion_before="1")
    assert state["versions"] == ["2"]  # exactly one version for the training run
    assert state["challenger"] == "2"
    assert state["champion"] == ("2" if want["decision"] == "promoted" else "1")
    assert state["tags"] == want


def test_expected_decisions_are_a_promote_and_a_reject():
    assert expected_tags(BETTER_TOX, "1")["decision"] == "promoted"
    assert expected_tags(WORSE_TOX, "1")["decision"] == "rejected"


def test_uninterrupted_register_and_gate_is_the_reference(store):
    result = gate_result(run_tail(store["work"], store["runs"]["B"], BETTER_TOX))
    assert (result["version"], result["decision"], result["champion_before"]) == ("2", "promoted", "1")
    assert_consistent(registry_state(store["cfg"], store["runs"]["B"]), BETTER_TOX)


KILLS = [  # (point, challenger toxicity): every write of register and gate; a rejected version moves no champion
    ("register_version", BETTER_TOX), ("set_challenger", BETTER_TOX),
    ("tag_reasons", BETTER_TOX), ("tag_reasons", WORSE_TOX),
    ("tag_decision", BETTER_TOX), ("tag_decision", WORSE_TOX),
    ("set_champion", BETTER_TOX),
]


@pytest.mark.parametrize(("point", "tox"), KILLS, ids=[f"{p}-{'promote' if t == BETTER_TOX else 'reject'}"
                                                      for p, t in KILLS])
def test_killed_register_or_gate_is_finished_by_the_retry(store, point, tox):
    run_b = store["runs"]["B"]
    proc = run_tail(store["work"], run_b, tox, fault=f"after:{point}")
    at_kill = killed_state(proc)
    assert at_kill["status"] == 137, proc.stderr[-3000:]  # the fault point exists and was reached
    assert at_kill["versions"] == ["2"]
    if at_kill["champion"] == "2":  # the champion never moves before the decision is recorded on the version
        assert at_kill["tags"] == expected_tags(tox, champion_before="1")
    result = gate_result(proc)  # the retry
    assert_consistent(registry_state(store["cfg"], run_b), tox)
    want = expected_tags(tox, champion_before="1")
    assert result["decision"] == ("promoted" if want["decision"] == "promoted" else "rejected")
    assert result["reasons"] == want["promotion.reasons"].split("\n")
    assert (result["version"], result["champion_before"]) == ("2", "1")


def test_a_repeated_gate_does_not_flip_a_recorded_decision(store):
    """A retry whose evaluation came out differently keeps the decision already recorded and applied."""
    run_b = store["runs"]["B"]
    first = gate_result(run_tail(store["work"], run_b, WORSE_TOX))
    assert first["decision"] == "rejected"
    again = gate_result(run_tail(store["work"], run_b, BETTER_TOX))
    assert again["decision"] == "rejected"
    assert_consistent(registry_state(store["cfg"], run_b), WORSE_TOX)


def test_a_retry_after_a_newer_version_leaves_challenger_on_the_newest(store, tmp_path):
    """Run B killed after registering; run C registers and is gated; B's retry finishes B but does not pull
    ``challenger`` back from the newer version, nor the champion C won."""
    T.setup(store["cfg"])
    run_b = store["runs"]["B"]
    # the kill only: the child's fault aborts the attempt, and the retry is the call made after run C
    killed = subprocess.run([sys.executable, "-c", DRIVER, str(store["work"]), run_b, str(BETTER_TOX)],
                            env={**_env(store["work"] / "cache"), "DETOXFLOW_FAULT": "after:register_version"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-3000:]
    model = policy_dir(store["tiny"], tmp_path / "model-C")
    parent = mlflow.MlflowClient().get_run(run_b).data.tags["mlflow.parentRunId"]
    with T.child_run("train_C", parent, cfg=store["cfg"]) as run_c:
        T.log_model_dir(model)
    newest = gate_result(run_tail(store["work"], run_c, 0.10))
    assert (newest["version"], newest["decision"]) == ("3", "promoted")
    retry = gate_result(run_tail(store["work"], run_b, BETTER_TOX))
    assert retry["version"] == "2"
    state = registry_state(store["cfg"], run_b)
    assert (state["versions"], state["challenger"], state["champion"]) == (["2"], "3", "3")
    assert state["tags"]["decision"] == "rejected"  # gated against champion 3 (0.10), which it does not beat
    assert state["tags"]["promotion.champion_before"] == "3"

"""The Prefect flows end to end on tiny random-weight models, under one session-wide Prefect test API.

What a user relies on:
- the pipeline runs prepare -> baseline -> train -> evaluate -> register -> gate in that order, under one MLflow
  parent run with a child run per stage, and the values handed between stages are the right ones (the split
  the model was evaluated on is the split prepare_data digested; the registered version is the trained run's
  artifact; the gate's decision is on the version);
- a rerun in a new process with the same inputs skips prepare_data and score_baseline (Prefect state Cached,
  and a log line says so); a change of the held-out data recomputes them;
- a training stage that fails (NaN) fails the flow run and registers nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from detoxflow.config import Config, load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data"
STAGES = ["prepare", "baseline", "train", "evaluate", "gate"]
PIPELINE_TAIL = ["evaluate_aligned", "register_model", "gate_and_promote"]


def write_split(src: Path, dest: Path, n: int) -> None:
    """The first n records of a shipped corpus split (the project's own text) as a split file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src.open(encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(n)]
    dest.write_text("".join(lines), encoding="utf-8")


def tiny_config(root: Path, model_dir: Path, name: str, *overrides: str) -> Config:
    return load_config(None, [
        f"name={name}", f"work_dir={root / 'work'}",
        f"data.source={root / 'data'}", "data.max_eval_samples=4",
        f"model.name_or_path={model_dir}", "model.num_threads=1", "model.device=cpu",
        "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.steps=1", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
        # these tests are about orchestration: a step too small to change any output keeps the gate's outcome
        # decided by the promotion rules under test, not by where one random PPO step happens to land
        "ppo.learning_rate=1e-8",
        "eval.k_samples=2", "eval.batch_size=8", "eval.bootstrap_samples=100", "eval.n_table_samples=3",
        f"tracking.uri=sqlite:///{root / 'work' / 'mlflow.db'}",
        *overrides,
    ])


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models) -> dict[str, Any]:
    """A tiny dataset folder (12 train / 4 test records) and a tiny T5 config; one cold pipeline run."""
    from detoxflow.flows.pipeline import pipeline

    if not (CORPUS / "train.jsonl").is_file():
        pytest.skip("the shipped corpus data/*.jsonl is missing")
    root = tmp_path_factory.mktemp("flows")
    write_split(CORPUS / "train.jsonl", root / "data" / "train.jsonl", 12)
    write_split(CORPUS / "test.jsonl", root / "data" / "test.jsonl", 4)
    cfg = tiny_config(root, tiny_models["t5"], "tiny")
    state = pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    return {"root": root, "cfg": cfg, "state": state, "summary": state.result(), "model_dir": tiny_models["t5"]}


# ------------------------------------------------------------------------------------------ helpers


def mlflow_client(cfg: Config):
    import mlflow

    from detoxflow import tracking

    tracking.setup(cfg)
    return mlflow.MlflowClient()  # the current tracking URI, as tracking.setup set it


def child_runs(cfg: Config, parent_run_id: str) -> list[Any]:
    cli = mlflow_client(cfg)
    exp = cli.get_run(parent_run_id).info.experiment_id
    runs = cli.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def task_runs(flow_run_id: Any) -> list[Any]:
    """Task runs of one flow run, oldest first (through the same API the flows used)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def flow_run_logs(flow_run_id: Any) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [entry.message for entry in logs]


def subflow_runs(parent_flow_run_id: Any) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id]))
        )


# ------------------------------------------------------------------------------------------ tests


def test_stages_run_in_order_and_hand_over_the_right_values(project):
    from detoxflow import tracking
    from detoxflow.models.data import load_split, split_digest

    cfg, summary = project["cfg"], project["summary"]
    flow_run_id = project["state"].state_details.flow_run_id

    # Prefect: the pipeline's own tasks in stage order, training as a subflow (a "train" run in the parent)
    names = [t.name.rsplit("-", 1)[0] for t in task_runs(flow_run_id)]
    assert names == ["prepare_data", "score_baseline", "train", *PIPELINE_TAIL]
    subflows = subflow_runs(flow_run_id)
    assert [f.state.is_completed() for f in subflows] == [True]
    assert [t.name.rsplit("-", 1)[0] for t in task_runs(subflows[0].id)] == ["train_ppo"]

    # MLflow: one child run per stage, in order, under the pipeline's parent run
    parent = summary["mlflow"]["parent_run_id"]
    children = child_runs(cfg, parent)
    assert [r.data.tags[tracking.TAG_STAGE] for r in children] == STAGES
    assert all(r.info.status == "FINISHED" for r in children)

    # prepare -> everything: the held-out split the metrics were measured on is the one prepare_data digested
    expected_eval = split_digest(load_split(cfg.data, cfg.data.eval_split))
    expected_train = split_digest(load_split(cfg.data, cfg.data.train_split))
    assert summary["eval_digest"] == expected_eval and summary["train_digest"] == expected_train
    by_stage = {r.data.tags[tracking.TAG_STAGE]: r for r in children}
    for stage in ("baseline", "evaluate"):
        assert by_stage[stage].data.tags["detoxflow.split_digest"] == expected_eval
    assert summary["n_eval"] == 4 and summary["n_train"] == 12

    # train -> register: the version is the training run's model artifact, alias challenger
    train_run = by_stage["train"]
    assert summary["mlflow"]["train_run_id"] == train_run.info.run_id
    version = tracking.get_version(cfg.registered_model_name, summary["version"])
    assert version.run_id == train_run.info.run_id and version.source == f"models:/{version.model_id}"
    assert version.split_digest == expected_eval
    assert tracking.get_alias(cfg.registered_model_name, tracking.CHALLENGER).version == summary["version"]

    # evaluate -> gate: the decision and every reason land on the version
    assert version.tags["decision"] == summary["decision"]
    assert version.tags["promotion.reasons"].splitlines() == summary["reasons"]
    assert len(summary["reasons"]) == 6
    champion = tracking.get_alias(cfg.registered_model_name, tracking.CHAMPION)
    assert (champion is not None and champion.version == summary["version"]) == (summary["decision"] == "promoted")

    # metrics the summary reports are the ones logged by the stages
    assert by_stage["baseline"].data.metrics["eval/toxicity_mean"] == pytest.approx(summary["toxicity_before"])
    assert by_stage["evaluate"].data.metrics["eval/toxicity_mean"] == pytest.approx(summary["toxicity_after"])
    assert set(summary["timings"]) == {*STAGES, "register", "total"}
    assert not any(summary["cached"].values())


def test_artifacts_summary_samples_and_progress(project):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = project["summary"]

    def latest(key: str):
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        assert found, f"no artifact {key}"
        return max(found, key=lambda a: a.created)

    md = latest("detoxflow-summary-tiny")
    assert md.type == "markdown"
    assert f"{summary['toxicity_before']:.4f}" in md.data and f"{summary['toxicity_after']:.4f}" in md.data
    assert summary["mlflow"]["parent_run_id"] in md.data and f"## Gate: **{summary['decision']}**" in md.data
    table = latest("detoxflow-samples-tiny")
    rows = json.loads(table.data)
    assert len(rows) == 3 and {"response_before", "response_after", "toxicity_before", "toxicity_after"} <= set(rows[0])
    progress = latest("detoxflow-train-progress-tiny")
    assert progress.type == "progress" and float(progress.data) == 100.0


def test_rerun_in_a_new_process_skips_prepare_and_baseline(project):
    """Same config, a new Python process (same API): the two cacheable stages come from the cache."""
    from prefect.settings import PREFECT_API_URL

    cfg: Config = project["cfg"]
    script = (
        "import json, sys\n"
        "from detoxflow.config import Config\n"
        "from detoxflow.flows.pipeline import pipeline\n"
        "state = pipeline(Config.model_validate_json(sys.stdin.read()), return_state=True)\n"
        "print('SUMMARY' + json.dumps({'ok': state.is_completed(), 'id': str(state.state_details.flow_run_id),"
        " 'summary': state.result() if state.is_completed() else None}))\n"
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run([sys.executable, "-c", script], input=cfg.model_dump_json(), env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("SUMMARY", 1)[1])
    assert out["ok"]
    summary = out["summary"]
    assert summary["cached"] == {"prepare": True, "baseline": True, "train": False, "evaluate": False,
                                 "register": False, "gate": False}
    # the cached values are the first run's
    first = project["summary"]
    assert summary["eval_digest"] == first["eval_digest"]
    assert summary["toxicity_before"] == pytest.approx(first["toxicity_before"])
    assert int(summary["version"]) == int(first["version"]) + 1
    # Prefect's own record: Cached states, and the log line saying the stage was skipped
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs(out["id"])}
    assert states["prepare_data"] == "Cached" and states["score_baseline"] == "Cached"
    assert states["evaluate_aligned"] == "Completed"
    logs = flow_run_logs(out["id"])
    assert any("prepare_data: cache hit, skipped" in m for m in logs)
    assert any("score_baseline: cache hit, skipped" in m for m in logs)


def test_changed_eval_data_recomputes_prepare_and_baseline(project):
    """Same config and path, one edited held-out record: the content digest changes, both stages run again."""
    from detoxflow.flows.pipeline import pipeline

    cfg: Config = project["cfg"]
    test_file = project["root"] / "data" / "test.jsonl"
    original = test_file.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    rows[0]["summary"] = rows[0]["summary"] + " (edited)"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        state = pipeline(cfg, return_state=True)
    finally:
        test_file.write_text(original)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["cached"]["prepare"] is False and summary["cached"]["baseline"] is False
    assert summary["eval_digest"] != project["summary"]["eval_digest"]
    assert summary["train_digest"] == project["summary"]["train_digest"]
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs(state.state_details.flow_run_id)}
    assert states["prepare_data"] == "Completed" and states["score_baseline"] == "Completed"


def test_failed_training_fails_the_flow_and_registers_nothing(project, monkeypatch):
    """NaN policy logprobs during PPO: the trainer raises, the flow run fails, the registry stays empty."""
    import torch

    from detoxflow import tracking
    from detoxflow.flows.pipeline import pipeline
    from detoxflow.models.policy import Policy

    original = Policy.forward

    def nan_forward(self, *args, **kwargs):
        logprobs, values, entropy = original(self, *args, **kwargs)
        return torch.full_like(logprobs, float("nan")), values, entropy

    monkeypatch.setattr(Policy, "forward", nan_forward)
    cfg = tiny_config(project["root"], project["model_dir"], "tiny-nan")
    state = pipeline(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="(?i)non-finite|nan"):
        state.result()
    assert tracking.list_versions(cfg.registered_model_name) == []
    # the train stage's MLflow run is marked failed, later stages never started
    cli = mlflow_client(cfg)
    exp = cli.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    parents = cli.search_runs([exp], filter_string="tags.`detoxflow.config_name` = 'tiny-nan' and "
                                                   "attributes.run_name = 'tiny-nan'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    stages = {r.data.tags[tracking.TAG_STAGE]: r.info.status for r in child_runs(cfg, parents[0].info.run_id)}
    assert stages == {"prepare": "FINISHED", "baseline": "FINISHED", "train": "FAILED"}
    # a NaN is deterministic: train_ppo is not retried
    train_flow_run = subflow_runs(state.state_details.flow_run_id)[0]
    train_tasks = task_runs(train_flow_run.id)
    assert [t.name.rsplit("-", 1)[0] for t in train_tasks] == ["train_ppo"]
    assert train_tasks[0].run_count == 1 and train_tasks[0].state.is_failed()


def test_evaluate_flow_reuses_the_baseline_and_reproduces_the_pipeline_numbers(project):
    from detoxflow.flows.evaluate import evaluate_flow

    cfg, first = project["cfg"], project["summary"]
    uri = f"models:/{cfg.registered_model_name}/{first['version']}"
    out = evaluate_flow(cfg, uri)
    assert out["cached"]["prepare"] and out["cached"]["baseline"] and not out["cached"]["evaluate"]
    assert out["eval_digest"] == first["eval_digest"]
    # the same model on the same prompts with the same settings: the pipeline's numbers, exactly
    assert out["toxicity_before"] == pytest.approx(first["toxicity_before"], abs=1e-9)
    assert out["toxicity_after"] == pytest.approx(first["toxicity_after"], abs=1e-9)
    assert out["metrics"]["eval/n_prompts"] == 4

    # a cache entry whose files were cleaned away is recomputed, not trusted
    for f in (project["root"] / "work" / "evals").glob("baseline-*.json"):
        f.unlink()
    again = evaluate_flow(cfg, uri)
    assert again["cached"]["prepare"] and not again["cached"]["baseline"]
    assert again["toxicity_before"] == pytest.approx(first["toxicity_before"], abs=1e-9)


def test_a_deployment_style_config_file_is_read_and_recorded_on_the_flow_run(project, monkeypatch):
    """What a deployment passes: a file under configs/ plus overrides, read when the run starts; the file, its
    digest and the overrides end up on the MLflow run and in a Prefect artifact of the flow run."""
    import hashlib

    import yaml
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from detoxflow.config import dump_yaml
    from detoxflow.flows.evaluate import evaluate_flow
    from detoxflow.tasks import config_source

    cfg, first = project["cfg"], project["summary"]
    home = project["root"] / "deployed-project"
    (home / "configs").mkdir(parents=True)
    text = dump_yaml(cfg).replace("n_table_samples: 3", "n_table_samples: 9")  # the override puts 3 back
    (home / "configs" / "tiny.yaml").write_text(text)
    monkeypatch.setattr(config_source, "PROJECT_ROOT", home)
    ref = config_source.ConfigFile(file="configs/tiny.yaml", overrides=["eval.n_table_samples=3"])
    state = evaluate_flow(ref, f"models:/{cfg.registered_model_name}/{first['version']}", return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    # it is the project's config again: the cached stages are hits and the numbers are the pipeline's
    assert out["cached"]["prepare"] and out["cached"]["baseline"]
    assert out["toxicity_after"] == pytest.approx(first["toxicity_after"], abs=1e-9)

    run = mlflow_client(cfg).get_run(out["mlflow_run_id"])
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert {k: run.data.tags.get(k) for k in ("detoxflow.config_file", "detoxflow.config_file_digest",
                                              "detoxflow.config_overrides", "detoxflow.config_digest")} == {
        "detoxflow.config_file": "configs/tiny.yaml", "detoxflow.config_file_digest": digest,
        "detoxflow.config_overrides": "eval.n_table_samples=3", "detoxflow.config_digest": cfg.digest()}
    logged = mlflow_client(cfg).download_artifacts(run.info.run_id, "config.yaml", str(project["root"]))
    assert yaml.safe_load(Path(logged).read_text()) == cfg.model_dump(mode="json")

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (md,) = [a for a in found if a.key == "detoxflow-config-tiny"]
    assert md.type == "markdown"
    assert "`configs/tiny.yaml`" in md.data and digest in md.data and "`eval.n_table_samples=3`" in md.data
    assert cfg.digest() in md.data and "n_table_samples: 3" in md.data


def test_promote_flow_moves_the_champion_only_when_the_gate_passes(project):
    from detoxflow import tracking
    from detoxflow.flows.promote import promote_flow

    cfg, first = project["cfg"], project["summary"]
    name = cfg.registered_model_name
    assert first["decision"] == "rejected"  # the default rules want a 20% drop; one tiny step gives none
    lenient = cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"min_toxicity_drop": 0.0})})
    out = promote_flow(lenient, f"models:/{name}/{first['version']}")
    assert out["promote"] and out["champion_after"] == first["version"], out["reasons"]
    assert out["champion_metrics"] is None  # no champion yet
    assert tracking.get_alias(name, tracking.CHAMPION).version == first["version"]
    assert tracking.get_version(name, first["version"]).tags["decision"] == "promoted"

    # the newest version must now beat that champion by 100%: impossible, so the champion stays. Other eval
    # settings (k=1) too: the champion's registered metrics no longer compare, so the gate re-evaluates it.
    strict = lenient.model_copy(update={
        "promotion": lenient.promotion.model_copy(update={"min_improvement_over_champion": 1.0}),
        "eval": lenient.eval.model_copy(update={"k_samples": 1}),
    })
    challenger = tracking.get_alias(name, tracking.CHALLENGER).version
    assert challenger != first["version"]
    out = promote_flow(strict, f"models:/{name}@challenger")
    assert not out["promote"] and out["version"] == challenger
    assert not out["cached"]["baseline"]  # new settings, new baseline
    assert any(r.startswith("BLOCK toxicity vs champion") for r in out["reasons"])
    assert out["champion_metrics"] == "re-evaluated"
    assert tracking.get_version(name, challenger).tags["promotion.champion_metrics"] == "re-evaluated"
    assert tracking.get_alias(name, tracking.CHAMPION).version == first["version"]
    assert tracking.get_version(name, challenger).tags["decision"] == "rejected"


def test_train_flow_alone_and_a_retry_resumes_from_the_checkpoint(project, monkeypatch):
    """`detoxflow train`: its own top-level MLflow run. An I/O failure after training is retried once, and the
    retry resumes from the newest checkpoint instead of training again."""
    from detoxflow import tracking
    from detoxflow.flows.train import train_flow
    from detoxflow.models import trainer

    cfg = tiny_config(project["root"], project["model_dir"], "tiny-train", "ppo.steps=2", "ppo.checkpoint_every=1")
    steps_run: list[int] = []
    real_step, real_log_model = trainer.ppo_step, tracking.log_model_dir
    failures = iter([OSError("artifact store unreachable")])

    def counting_step(*args, **kwargs):
        steps_run.append(args[4])  # the 1-based step number
        return real_step(*args, **kwargs)

    def flaky_log_model(*args, **kwargs):
        for exc in failures:  # fails the first time only
            raise exc
        return real_log_model(*args, **kwargs)

    monkeypatch.setattr(trainer, "ppo_step", counting_step)
    monkeypatch.setattr(tracking, "log_model_dir", flaky_log_model)
    state = train_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert steps_run == [1, 2]  # the retry found step-2 and trained nothing again
    (task,) = task_runs(state.state_details.flow_run_id)
    assert task.run_count == 2 and task.state.is_completed()

    cli = mlflow_client(cfg)
    run = cli.get_run(result["run_id"])
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags[tracking.TAG_STAGE] == "train"
    assert result["model_uri"] == f"runs:/{result['run_id']}/model" and result["steps"] == 2
    assert Path(result["checkpoint_dir"]).name == "step-2"
    assert Path(result["checkpoint_dir"]).parent.parent.parent.name == result["run_id"]  # keyed by the run
    import mlflow

    assert mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/train/result.json") == json.loads(json.dumps(result))
    assert tracking.load_model(result["model_uri"]).is_seq2seq

"""MLflow tracking, registry and locks on a local SQLite store (no server): what the pipeline relies on."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from servers import migrated_sqlite_store, store_work_dir

from detoxflow.config import Config, load_config
from detoxflow.locks import LockTimeout, gate_lock, lock_file_path, lock_key

mlflow = pytest.importorskip("mlflow")
from detoxflow import tracking as T  # noqa: E402


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema created once: the migrations take ~10 s on a busy 2-core box."""
    return migrated_sqlite_store(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture
def cfg(tmp_path, monkeypatch, empty_store) -> Config:
    return Config(name="unit", work_dir=str(store_work_dir(tmp_path, monkeypatch, empty_store)))


@pytest.fixture(scope="module")
def saved_policy(tiny_models, tmp_path_factory):
    """``saved(marker) -> folder``: a real saved policy (tiny random T5 + LoRA) whose detoxflow.json carries
    ``marker``, as training leaves it for ``log_model_dir``."""
    import torch

    from detoxflow.config import LoraSection, ModelConfig
    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models["t5"]), device="cpu"), LoraSection(r=4))
    root = tmp_path_factory.mktemp("saved-policies")
    return lambda marker: policy.save_artifact(root / marker, extra={"marker": marker})


def _model_dir(root: Path, marker: str) -> Path:
    """A folder shaped like a model logged before the policy was an MLflow model (the registry's legacy path
    only cares that ``model/`` is a folder of files with a detoxflow.json)."""
    d = root / f"model-{marker}"
    d.mkdir(parents=True)
    (d / "detoxflow.json").write_text(json.dumps({"marker": marker}))
    (d / "value_head.pt").write_bytes(b"\0" * 16)
    return d


def test_tracking_uri_precedence_and_local_default(cfg, tmp_path, monkeypatch):
    work = tmp_path / "work"
    assert T.tracking_uri(cfg) == f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert T.tracking_uri(cfg) == "http://example.invalid:5000"
    explicit = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": "sqlite:////x/y.db"})})
    assert T.tracking_uri(explicit) == "sqlite:////x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    exp_id = T.setup(cfg)
    assert T.setup(cfg) == exp_id  # idempotent
    exp = mlflow.MlflowClient().get_experiment(exp_id)
    assert exp.name == "detoxflow"
    assert exp.artifact_location == (work / "mlartifacts").as_uri()
    assert (work / "mlflow.db").is_file()


def test_parent_run_logs_flattened_params_tags_and_config(cfg):
    long_template = "Summarize: {dialogue} " + "x" * 7000
    cfg = load_config(None, ["name=unit", f"work_dir={cfg.work_dir}", "ppo.kl.target=4.5",
                             "lora.target_modules=[q, v]", f"data.prompt_template={long_template}"])
    with T.parent_run(cfg, "pipeline") as run_id:
        assert mlflow.active_run().info.run_id == run_id
    run = mlflow.MlflowClient().get_run(run_id)
    params = run.data.params
    assert set(params) == set(cfg.flat())
    assert params["ppo.kl.target"] == "4.5"
    assert params["ppo.steps"] == "20"
    assert params["lora.target_modules"] == '["q", "v"]'
    assert params["data.max_train_samples"] == "null"
    assert params["model.name_or_path"] == "embedded:t5"
    assert len(params["data.prompt_template"]) == T.MAX_PARAM_CHARS
    assert params["data.prompt_template"].endswith("[truncated]")

    tags = run.data.tags
    assert tags[T.TAG_CONFIG_DIGEST] == cfg.digest()
    assert tags[T.TAG_BASE_MODEL] == "embedded:t5"
    assert tags[T.TAG_REWARD_MODEL] == "profanity_check"
    assert tags[T.TAG_VERSION]
    sha, _ = T.git_state()
    if sha:  # this checkout is a git repo, so the sha must be recorded
        assert tags[T.TAG_GIT_SHA] == sha and len(sha) == 40
    assert run.info.status == "FINISHED"
    # the untruncated config is in the run, and it reloads to the same config
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert Config.model_validate(yaml.safe_load(text)).digest() == cfg.digest()


def test_model_ids_name_revision_and_reward_classifier():
    cfg = load_config(None, ["model.name_or_path=google/flan-t5-base", "model.revision=abc123",
                             "reward.kind=hf_classifier", "reward.model=facebook/roberta-hate-speech"])
    assert T.model_ids(cfg) == ("google/flan-t5-base@abc123", "facebook/roberta-hate-speech")


def test_parent_run_fails_on_exception_and_resumes_with_same_config_only(cfg):
    with pytest.raises(RuntimeError, match="boom"):
        with T.parent_run(cfg, "pipeline") as run_id:
            raise RuntimeError("boom")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"

    with T.parent_run(cfg, run_id=run_id) as resumed:
        assert resumed == run_id
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"

    other = load_config(None, ["name=unit", f"work_dir={cfg.work_dir}", "ppo.steps=7"])
    with pytest.raises(T.TrackingError, match="ppo.steps"):
        with T.parent_run(other, run_id=run_id):
            pass


def test_child_runs_nest_from_worker_threads_and_retries_resume(cfg):
    T.setup(cfg)
    client = mlflow.MlflowClient()
    errors: list[BaseException] = []

    def stage(parent: str, name: str, fail: bool, out: dict) -> None:
        # a Prefect task in a worker thread: no active run here, only the parent's id
        try:
            with T.child_run(name, parent_run_id=parent) as rid:
                out[name] = rid
                T.log_metrics({"eval/x": 1.0}, run_id=rid)
                if fail:
                    raise RuntimeError("stage failed")
        except RuntimeError:
            pass
        except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
            errors.append(e)

    with T.parent_run(cfg, "pipeline") as parent:
        first: dict[str, str] = {}
        t = threading.Thread(target=stage, args=(parent, "train", True, first))
        t.start()
        t.join()
        assert client.get_run(first["train"]).info.status == "FAILED"

        retry: dict[str, str] = {}
        t = threading.Thread(target=stage, args=(parent, "train", False, retry))
        t.start()
        t.join()
        assert retry["train"] == first["train"], "a retried stage must continue its failed child run"

        t = threading.Thread(target=stage, args=(parent, "evaluate_aligned", False, retry))
        t.start()
        t.join()
        # in the flow's own thread the parent is the active run
        with T.child_run("gate") as gate_id:
            pass
    assert not errors, errors
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.data.tags[T.TAG_STAGE] for r in children} == {"train", "evaluate_aligned", "gate"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert gate_id in {r.info.run_id for r in children}
    assert client.get_run(retry["train"]).data.tags["mlflow.runName"] == "train"
    # a finished stage is not reused: a second one with the same name gets a new run
    with T.child_run("train", parent_run_id=parent, cfg=cfg) as again:
        pass
    assert again != retry["train"]


def test_child_run_without_parent_is_a_clear_error(cfg):
    T.setup(cfg)
    with pytest.raises(T.TrackingError, match="parent_run_id"):
        with T.child_run("train"):
            pass


def test_log_split_records_dataset_lineage(cfg):
    ids = [f"dlg-{i}" for i in range(5)]
    with T.parent_run(cfg, "pipeline") as run_id:
        T.log_split("test", "0123456789abcdef", "embedded", ids, "evaluation", run_id=run_id)
        T.log_split("train", "fedcba9876543210", "hf:knkarthick/dialogsum", ids[:3], "training")
    run = mlflow.MlflowClient().get_run(run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"test", "train"}
    test = inputs["test"]
    assert test.dataset.digest == "0123456789abcdef"
    assert json.loads(test.dataset.profile)["num_rows"] == 5
    assert {t.key: t.value for t in test.tags}["mlflow.data.context"] == "evaluation"
    train = inputs["train"]
    assert train.dataset.source_type == "hugging_face"
    assert json.loads(train.dataset.source)["path"] == "knkarthick/dialogsum"
    assert run.data.tags["detoxflow.data.test.digest"] == "0123456789abcdef"
    assert run.data.tags["detoxflow.data.test.n"] == "5"
    logged = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/test.ids.json"))
    assert logged["ids"] == ids and logged["digest"] == "0123456789abcdef"


def test_metric_logger_batches_and_skips_non_finite(cfg, caplog):
    torch = pytest.importorskip("torch")
    with T.parent_run(cfg, "pipeline") as run_id:
        log = T.metric_logger(run_id)
        with caplog.at_level(logging.WARNING, logger="detoxflow.tracking"):
            log({"objective/kl": 0.5, "objective/scores": float("nan"), "loss/total": torch.tensor(2.0)}, step=1)
            log({"objective/kl": 0.25, "objective/scores": float("inf"), "loss/total": 1.5}, step=2)
            log({"objective/kl": 0.125, "env/note": "n/a"}, step=3)
    client = mlflow.MlflowClient()
    kl = client.get_metric_history(run_id, "objective/kl")
    assert [(m.step, m.value) for m in sorted(kl, key=lambda m: m.step)] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert [m.value for m in client.get_metric_history(run_id, "loss/total")] == [2.0, 1.5]
    assert client.get_metric_history(run_id, "objective/scores") == []
    assert client.get_metric_history(run_id, "env/note") == []
    assert log.skipped == {"objective/scores": 2, "env/note": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, "warn once per bad key, not on every step"
    assert "objective/scores=nan" in warnings[0].getMessage()


def test_log_table_replaces_instead_of_appending(cfg):
    with T.parent_run(cfg, "pipeline") as run_id:
        T.log_table([{"prompt": "a", "before": "x", "after": "y"}], "eval/samples.json")
        T.log_table([{"prompt": "b", "before": "x2", "after": "y2"}], "eval/samples.json")  # a retried task
        T.log_json({"eval/toxicity_mean": 0.1}, "eval/metrics.json")
    run = mlflow.MlflowClient().get_run(run_id)
    table = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/eval/samples.json"))
    assert table["columns"] == ["prompt", "before", "after"]
    assert table["data"] == [["b", "x2", "y2"]]
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "eval/samples.json", "type": "table"}]
    assert json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/eval/metrics.json")) == {
        "eval/toxicity_mean": 0.1}


def test_register_creates_versions_moves_challenger_and_tags(cfg, tmp_path, saved_policy):
    name = cfg.registered_model_name
    assert name == "detoxflow-unit"
    with T.parent_run(cfg, "pipeline"):
        T.log_split(cfg.data.eval_split, "feedfacefeedface", "embedded", ["a", "b"], "evaluation")
        with T.child_run("train") as train1:
            uri1 = T.log_model_dir(saved_policy("one"))
        v1 = T.register_model(cfg, train1, metrics={"eval/toxicity_mean": 0.25, "eval/rouge_l": float("nan")})
        assert v1 == "1"
        assert T.get_alias(name, T.CHALLENGER).version == "1"
        assert T.get_alias(name, T.CHAMPION) is None  # no champion yet: the gate's first-model case
        with T.child_run("train_2") as train2:
            T.log_model_dir(saved_policy("two"))
        v2 = T.register_model(cfg, train2, split_digest="0000aaaa0000aaaa", tags={"detoxflow.alarms": []})
    assert v2 == "2"
    challenger = T.get_alias(name, T.CHALLENGER)
    assert (challenger.version, challenger.run_id) == ("2", train2)
    assert challenger.aliases == ("challenger",)
    v1_info = T.get_version(name, 1)
    assert v1_info.aliases == ()
    # the version is the run's logged model: same id, and the metrics live on the model, not in version tags
    client = mlflow.MlflowClient()
    assert uri1 == f"models:/{v1_info.model_id}"
    assert client.get_logged_model(v1_info.model_id).source_run_id == train1
    assert v1_info.metrics == {"eval/toxicity_mean": 0.25}  # NaN is never recorded
    assert not [k for k in v1_info.tags if k.startswith(T.METRIC_TAG_PREFIX)]
    assert v1_info.split_digest == "feedfacefeedface"  # found on the parent run, where log_split put it
    assert challenger.split_digest == "0000aaaa0000aaaa"
    assert challenger.tags[T.TAG_CONFIG_DIGEST] == cfg.digest()
    assert challenger.tags[T.TAG_BASE_MODEL] == "embedded:t5"
    assert challenger.tags["detoxflow.alarms"] == "[]"

    T.set_champion(name, v1)
    T.tag_version(name, v1, {"detoxflow.decision": "promote", "detoxflow.reasons": ["toxicity -40%", "rouge ok"]})
    champion = T.get_alias(name, T.CHAMPION)
    assert champion.version == "1"
    assert json.loads(champion.tags["detoxflow.reasons"]) == ["toxicity -40%", "rouge ok"]
    assert [v.version for v in T.list_versions(name)] == ["1", "2"]
    assert T.get_alias("detoxflow-no-such-model", T.CHAMPION) is None

    # what `detoxflow generate --model models:/NAME@champion` resolves to: version 1's MLflow model, read in place
    local = T.fetch_model(f"models:/{name}@{T.CHAMPION}")
    assert (local / "MLmodel").is_file()
    assert json.loads((local / "artifacts" / "detoxflow.json").read_text())["marker"] == "one"
    downloaded = T.fetch_model(f"runs:/{train2}/model")
    assert json.loads((downloaded / "artifacts" / "detoxflow.json").read_text())["marker"] == "two"
    assert downloaded.is_relative_to(tmp_path / "cache")
    with pytest.raises(T.TrackingError, match="Aliases present: challenger, champion"):
        T.fetch_model(f"models:/{name}@production")


def test_a_registry_written_before_the_pyfunc_model_still_loads(cfg, saved_policy):
    """A run that logged the bare artifact folder as ``model/`` (no MLmodel): it registers, its metrics stay
    version tags, and ``generate``'s loader and ``load_model`` read it."""
    from detoxflow.config import DataConfig, GenerationConfig
    from detoxflow.models.policy import Policy

    folder = saved_policy("legacy")
    name = cfg.registered_model_name
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run_id:
            T.log_dir(folder, "model")  # what log_model_dir wrote before
        version = T.register_model(cfg, run_id, metrics={"eval/toxicity_mean": 0.5})
    info = T.get_version(name, version)
    assert info.model_id is None and info.source.endswith(f"{run_id}/artifacts/model")
    assert info.metrics == {"eval/toxicity_mean": 0.5} and info.tags["metric.eval/toxicity_mean"] == "0.5"
    gen = GenerationConfig(max_new_tokens=6, min_new_tokens=0, do_sample=False)
    prompts = ["Summarize: the order came late"]
    want = Policy.from_artifact(folder, device="cpu").generate_texts(prompts, gen, max_query_tokens=512, tail="")
    got = T.load_generator(f"models:/{name}/{version}").summarize(prompts, gen, DataConfig(max_query_tokens=512))
    assert got == want
    assert T.load_model(f"models:/{name}/{version}", device="cpu").generate_texts(prompts, gen) == want


def test_register_without_model_artifact_names_the_fix(cfg):
    with T.parent_run(cfg, "pipeline") as run_id:
        pass
    with pytest.raises(T.TrackingError, match="log_model_dir"):
        T.register_model(cfg, run_id)


def test_load_model_round_trips_a_real_policy(cfg, tiny_models, tmp_path):
    torch = pytest.importorskip("torch")
    from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models["t5"]), device="cpu"), LoraSection(r=4))
    art = policy.save_artifact(tmp_path / "art", extra={"config": {"name": "unit"}})
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as train_id:
            T.log_model_dir(art)
        T.register_model(cfg, train_id)
    loaded = T.load_model(f"models:/{cfg.registered_model_name}@challenger", device="cpu")
    gen = GenerationConfig(max_new_tokens=8, min_new_tokens=2, do_sample=False)
    prompts = ["Summarize: the customer wants a refund"]
    assert loaded.generate_texts(prompts, gen) == policy.generate_texts(prompts, gen)


# ------------------------------------------------------------------------------------------ gate lock


def test_file_gate_lock_excludes_other_threads_and_is_reentrant(cfg):
    path = lock_file_path(cfg)
    assert path == Path(cfg.work_dir) / "mlflow.db.gate-detoxflow-unit.lock"  # beside the SQLite store
    with gate_lock(cfg):
        with gate_lock(cfg, timeout=0.1):  # re-entrant: register_model inside a gate must not deadlock
            pass
        result: list[str] = []

        def contender() -> None:
            try:
                with gate_lock(cfg, timeout=0.3):
                    result.append("acquired")
            except LockTimeout as e:
                result.append(str(e))

        t = threading.Thread(target=contender)
        t.start()
        t.join()
        assert "not acquired within" in result[0] and "detoxflow-unit" in result[0]
    # released: now it can be taken
    with gate_lock(cfg, timeout=1):
        pass
    other = cfg.model_copy(update={"name": "other"})
    with gate_lock(cfg), gate_lock(other, timeout=0.3):  # different models do not contend
        pass


def test_file_gate_lock_excludes_another_process(cfg, tmp_path):
    script = (
        "import sys\n"
        "from detoxflow.config import Config\n"
        "from detoxflow.locks import gate_lock, LockTimeout\n"
        f"cfg = Config(name='unit', work_dir={str(cfg.work_dir)!r})\n"
        "try:\n"
        "    with gate_lock(cfg, timeout=float(sys.argv[1])):\n"
        "        sys.exit(0)\n"
        "except LockTimeout:\n"
        "    sys.exit(3)\n"
    )
    env_cmd = [sys.executable, "-c", script]
    with gate_lock(cfg):
        held = subprocess.run([*env_cmd, "0.5"], capture_output=True, text=True, timeout=120)
    free = subprocess.run([*env_cmd, "5"], capture_output=True, text=True, timeout=120)
    assert held.returncode == 3, held.stderr
    assert free.returncode == 0, free.stderr


def test_gate_lock_serialises_concurrent_champion_updates(cfg, tmp_path):
    """The read-decide-write race the lock exists for: the best challenger must end up champion."""
    name = cfg.registered_model_name
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run_id:
            T.log_dir(_model_dir(tmp_path, "m"), "model")  # a bare folder: this test is about the lock
    toxicities = [0.30, 0.12, 0.25, 0.05, 0.20, 0.15]
    versions = [T.register_model(cfg, run_id, metrics={"eval/toxicity_mean": x}) for x in toxicities]
    errors: list[BaseException] = []
    start = threading.Barrier(len(versions))

    def gate(version: str) -> None:
        try:
            start.wait()
            with gate_lock(cfg, timeout=60):
                mine = T.get_version(name, version).metrics["eval/toxicity_mean"]
                champ = T.get_alias(name, T.CHAMPION)
                time.sleep(0.05)  # the decision takes time; without the lock another gate interleaves here
                if champ is None or mine < champ.metrics["eval/toxicity_mean"]:
                    T.set_champion(name, version)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=gate, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    best = versions[toxicities.index(min(toxicities))]
    assert T.get_alias(name, T.CHAMPION).version == best


def test_sqlite_paths_follow_sqlalchemy(tmp_path, monkeypatch):
    from detoxflow.locks import sqlite_path

    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///rel/mlflow.db") == tmp_path / "rel" / "mlflow.db"
    assert sqlite_path("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql+psycopg2://u@h/db") is None
    cfg = Config(name="rel", work_dir=str(tmp_path / "w"), tracking={"uri": "sqlite:///store/m.db"})
    assert T.artifact_location(cfg) == (tmp_path / "store" / "mlartifacts").as_uri()
    assert lock_file_path(cfg) == tmp_path / "store" / "m.db.gate-detoxflow-rel.lock"


def test_lock_key_is_stable_signed_64_bit():
    k = lock_key("detoxflow.gate:detoxflow-default")
    assert k == lock_key("detoxflow.gate:detoxflow-default")
    assert -(2**63) <= k < 2**63
    assert k != lock_key("detoxflow.gate:detoxflow-other")


def test_two_processes_create_a_fresh_sqlite_store_at_once(tmp_path, monkeypatch):
    """Two runs started together on a new work dir: MLflow creates the SQLite tables on first use, and without
    the init lock in ``tracking.setup`` the second creator failed with "table ... already exists"."""
    for var in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "fresh"
    script = (
        "import sys, time\n"
        "from detoxflow.config import Config\n"
        "from detoxflow import tracking\n"
        f"cfg = Config(name='race', work_dir={str(work)!r})\n"
        "start = float(sys.argv[1])\n"
        "while time.time() < start:\n"
        "    time.sleep(0.001)\n"
        "print(tracking.setup(cfg))\n"
    )
    start = time.time() + 15  # both processes have imported MLflow by then, and then start together
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    # one experiment, the same id in both processes
    assert len({out.strip() for out, _ in results}) == 1


def test_log_split_retries_a_dataset_row_another_run_inserted_first(cfg, monkeypatch):
    """Two runs logging the same split at once: the store refuses the second insert of the dataset row (a unique
    key); the retry links the existing row instead of failing the run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_inputs
    calls = []

    def racing(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"')
        return real(self, run_id, datasets=datasets, models=models)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    with T.parent_run(cfg, "pipeline") as run_id:
        T.log_split("test", "abc123", "embedded", ["a", "b"], "evaluation", run_id=run_id)
    assert len(calls) == 2
    run = mlflow.get_run(run_id)
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["abc123"]

    def refused(self, run_id, datasets=None, models=None):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    monkeypatch.setattr(MlflowClient, "log_inputs", refused)
    with pytest.raises(MlflowException, match="not found"), T.parent_run(cfg, "pipeline") as run_id:
        T.log_split("test", "abc123", "embedded", ["a"], "evaluation", run_id=run_id)

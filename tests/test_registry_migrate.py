"""`detoxflow registry migrate` on a local SQLite store (no server).

What a user relies on: a version registered before the policy was an MLflow model (its source a bare folder, no
``MLmodel``) cannot be loaded by ``mlflow.pyfunc.load_model``; after one command its pyfunc successor is, with the
same weights (``predict`` equals greedy ``detoxflow generate`` of the old version), the old version's tags,
description and metrics, ``migrated_from``, an adapter that names its base portably, and every alias of the old
version; ``--dry-run`` changes nothing; a second run changes nothing and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from servers import migrated_sqlite_store, store_work_dir
from test_cli_output import invoke

from detoxflow.config import Config, LoraSection, ModelConfig

mlflow = pytest.importorskip("mlflow")
from detoxflow import tracking as T  # noqa: E402

PROMPT = "Summarize: #Person1# says the parcel was late. #Person2# promises a new one."
OLD_BASE_PATH = "/home/trainer/.cache/detoxflow/embedded/t5"  # what PEFT wrote into adapter_config.json then


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    return migrated_sqlite_store(tmp_path_factory.mktemp("migrate-store") / "mlflow.db")


@pytest.fixture
def cfg(tmp_path, monkeypatch, empty_store) -> Config:
    cfg = Config(name="mig", work_dir=str(store_work_dir(tmp_path, monkeypatch, empty_store)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", T.tracking_uri(cfg))  # the commands read this store
    return cfg


@pytest.fixture(scope="module")
def old_folder(tiny_models, tmp_path_factory) -> Path:
    """A saved policy as the older code left it: PEFT's absolute path of the trainer's base in the adapter."""
    import torch

    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models["t5"]), device="cpu"), LoraSection(r=4))
    folder = policy.save_artifact(tmp_path_factory.mktemp("old-policy") / "model")
    config = folder / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": OLD_BASE_PATH}))
    return folder


def register_the_old_way(cfg: Config, folder: Path) -> str:
    """What detoxflow did before the pyfunc model: the training run's ``model/`` artifact is the bare folder and the
    version's source is that folder; described, its metrics as ``metric.*`` tags, made champion."""
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run_id:
            T.log_dir(folder, "model")
        version = T.register_model(cfg, run_id, metrics={"eval/toxicity_mean": 0.25}, tags={"decision": "promoted"})
    T.describe_version(cfg.registered_model_name, version, "toxicity 0.4000 -> 0.2500 | promoted")
    T.set_champion(cfg.registered_model_name, version)
    return version


cli = invoke  # detoxflow ARGS in this process


def test_migrate_makes_an_old_version_an_mlflow_model_with_its_weights_tags_and_aliases(cfg, old_folder):
    import pandas as pd

    name = cfg.registered_model_name
    old = register_the_old_way(cfg, old_folder)
    before = T.get_version(name, old)
    assert before.model_id is None and sorted(before.aliases) == ["challenger", "champion"]
    with pytest.raises(Exception, match="MLmodel"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")

    def registry() -> list[tuple]:
        found = [T.get_version(name, v.version) for v in T.list_versions(name)]
        return [(v.version, v.source, sorted(v.aliases), v.tags, v.description) for v in found]

    snapshot = registry()
    dry = cli("registry", "migrate", "--dry-run")
    assert dry.exit_code == 0, dry.stderr + repr(dry.exception)
    assert dry.stdout.splitlines() == [
        f"would migrate {name} v{old} -> a new version (new pyfunc version; aliases to move: challenger, champion)"]
    assert registry() == snapshot

    done = cli("registry", "migrate")
    assert done.exit_code == 0, done.stderr + repr(done.exception)
    (new,) = [v.version for v in T.list_versions(name) if v.version != old]
    assert done.stdout.splitlines() == [
        f"{name} v{old} -> v{new} (new pyfunc version; aliases moved: challenger, champion)"]
    info = T.get_version(name, new)
    assert info.model_id and info.source == f"models:/{info.model_id}" and info.run_id == before.run_id
    assert info.tags == {**before.tags, "migrated_from": old}
    assert info.description == before.description
    assert sorted(info.aliases) == ["challenger", "champion"] and T.get_version(name, old).aliases == ()
    assert info.metrics["eval/toxicity_mean"] == 0.25
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{info.model_id}"))
    adapter = json.loads((local / "artifacts" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "../base"
    old_adapter = Path(urlsplit(before.source).path) / "adapter" / "adapter_config.json"
    assert json.loads(old_adapter.read_text())["base_model_name_or_path"] == OLD_BASE_PATH  # the old one untouched

    # MLflow's own loader reads @champion now, and it is the same model: greedy `generate` of the old version
    predicted = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({"prompt": [PROMPT]}))
    generated = cli("generate", "--model", f"models:/{name}/{old}", PROMPT)
    assert generated.exit_code == 0, generated.stderr + repr(generated.exception)
    assert generated.stdout == "".join(f"{text}\n" for text in predicted["summary"])

    again = cli("registry", "migrate")
    assert again.exit_code == 0, again.stderr + repr(again.exception)
    assert again.stdout.splitlines() == ["nothing to migrate: every version is an MLflow model (1 version(s) migrated before)"]
    assert [v.version for v in T.list_versions(name)] == [old, new]


def test_migrate_finishes_an_interrupted_move_and_names_a_missing_model(cfg, old_folder):
    """A migration stopped after registering (the aliases still on the old version) is completed, not repeated;
    an unknown --model is named with the models there are."""
    name = cfg.registered_model_name
    old = register_the_old_way(cfg, old_folder)
    assert cli("registry", "migrate", "--model", name).exit_code == 0
    (new,) = [v.version for v in T.list_versions(name) if v.version != old]
    T.set_alias(name, "champion", old)  # as if the run had stopped before moving this alias
    resumed = cli("registry", "migrate", "--model", name)
    assert resumed.exit_code == 0, resumed.stderr + repr(resumed.exception)
    assert resumed.stdout.splitlines() == [f"{name} v{old} -> v{new} (already migrated; aliases moved: champion)"]
    assert [v.version for v in T.list_versions(name)] == [old, new]
    assert T.get_alias(name, "champion").version == new

    missing = cli("registry", "migrate", "--model", "detoxflow-nope")
    assert isinstance(missing.exception, T.TrackingError)
    assert "--model detoxflow-nope: no such registered model" in str(missing.exception)
    assert f"detoxflow models there: {name}" in str(missing.exception)

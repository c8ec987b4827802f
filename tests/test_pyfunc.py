"""The policy as an MLflow pyfunc model and the registry a person reads, on a local SQLite store (no server).

What a user relies on:
- the training run's model is an MLflow model: a signature (``prompt`` in, ``summary`` out, generation settings
  as params), an input example, pinned requirements (nothing inferred), detoxflow's version and git sha, and an
  adapter that names its base portably; ``predict`` equals the policy's own greedy generation;
- a registered, gated version reads at a glance: ``toxicity_before`` / ``toxicity_after`` / ``toxicity_change``
  / ``rouge_l`` / ``kl`` / ``decision`` tags, a description with the headline, decision and reasons, a model
  card on the logged model; decisions say promoted / rejected everywhere;
- the parent run carries the headline numbers as metrics; the experiment opens on its runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.version import Version
from servers import migrated_sqlite_store, store_work_dir

from detoxflow.config import Config, GenerationConfig, LoraSection, ModelConfig

mlflow = pytest.importorskip("mlflow")
from detoxflow import tracking as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Summarize: #Person1# says the parcel was late. #Person2# promises a new one."


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    return migrated_sqlite_store(tmp_path_factory.mktemp("pyfunc-store") / "mlflow.db")


@pytest.fixture
def cfg(tmp_path, monkeypatch, empty_store) -> Config:
    return Config(name="pyf", work_dir=str(store_work_dir(tmp_path, monkeypatch, empty_store)))


@pytest.fixture(scope="module")
def policy_and_folder(tiny_models, tmp_path_factory):
    import torch

    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models["t5"]), device="cpu"), LoraSection(r=4))
    return policy, policy.save_artifact(tmp_path_factory.mktemp("pyfunc-policy") / "artifact")


def test_the_logged_model_is_an_mlflow_model_with_signature_requirements_and_lineage(cfg, policy_and_folder):
    policy, folder = policy_and_folder
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "../base"  # not the trainer's absolute cache path
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run_id:
            uri = T.log_model_dir(folder)
    client = mlflow.MlflowClient()
    model_id = uri.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("model", run_id, "READY")
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]

    local = Path(mlflow.artifacts.download_artifacts(uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert mlmodel["metadata"] == {"detoxflow.version": importlib.metadata.version("detoxflow"),
                                   "detoxflow.git_sha": sha}
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "string", "name": "prompt", "required": True}]
    assert json.loads(mlmodel["signature"]["outputs"]) == [{"type": "string", "name": "summary", "required": True}]
    params = {p["name"]: (p["type"], p["default"]) for p in json.loads(mlmodel["signature"]["params"])}
    assert params == {"max_new_tokens": ("long", 48), "do_sample": ("boolean", False), "temperature": ("double", 1.0),
                      "top_p": ("double", 1.0), "top_k": ("long", 0), "truncation": ("string", "keep_instruction")}
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    import peft
    import torch
    import transformers

    reqs = (local / "requirements.txt").read_text().split()
    assert all("==" in r for r in reqs)  # pinned, none inferred loosely
    pinned = dict(r.split("==") for r in reqs)
    # the pin is the installed wheel's version; torch.__version__ may add a build label the wheel lacks (2.6.0+cu124)
    assert Version(pinned["torch"]).public == Version(torch.__version__).public
    assert {f"transformers=={transformers.__version__}", f"peft=={peft.__version__}",
            f"mlflow=={mlflow.__version__}"} <= set(reqs)
    # the policy's parts, side by side: base, adapter, tokenizer, value head, detoxflow.json
    assert {p.name for p in (local / "artifacts").iterdir()} == {"base", "adapter", "tokenizer", "value_head.pt",
                                                                "detoxflow.json"}

    import pandas as pd

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    gen = GenerationConfig(max_new_tokens=12, min_new_tokens=0, do_sample=False)
    want = policy.generate_texts([PROMPT, "Summarize: hi"], gen)
    got = model.predict(pd.DataFrame({"prompt": [PROMPT, "Summarize: hi"]}), params={"max_new_tokens": 12})
    assert got["summary"].tolist() == want
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"text": [PROMPT]}))


def test_generation_params_are_checked():
    from detoxflow.tracking.pyfunc import generation_settings

    gen, data = generation_settings({"max_new_tokens": 7, "do_sample": True, "top_p": 0.9})
    assert (gen.max_new_tokens, gen.do_sample, gen.top_p, gen.min_new_tokens) == (7, True, 0.9, 0)
    assert data.max_query_tokens == 512 and data.truncation == "keep_instruction"
    with pytest.raises(ValueError, match=r"unknown generation param\(s\) \['beams'\]"):
        generation_settings({"beams": 4})


BASELINE = {"eval/toxicity_mean": 0.40, "eval/rouge_l": 0.30, "eval/length_mean": 20.0}
SPLIT, SETTINGS = "d1d1d1d1d1d1d1d1", "5e5e5e5e5e5e5e5e"


def _evaluation(tox: float) -> dict:
    return {"metrics": {**BASELINE, "eval/toxicity_mean": tox, "eval/rouge_l": 0.29}, "split_digest": SPLIT,
            "settings_digest": SETTINGS, "alarms": [],
            "comparison": {"eval/toxicity_before": 0.40, "eval/toxicity_rel_change": (tox - 0.40) / 0.40}}


def test_a_gated_version_reads_at_a_glance(cfg, policy_and_folder):
    from detoxflow.tasks.registry import gate_and_promote, register_model

    _, folder = policy_and_folder
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run_id:
            T.log_model_dir(folder)
    train = {"run_id": run_id, "summary": {"train/kl_mean": 1.5}}
    baseline = {"metrics": BASELINE, "split_digest": SPLIT, "settings_digest": SETTINGS}
    ev = _evaluation(0.10)
    registered = register_model.fn(cfg, run_id, ev, train)
    gate = gate_and_promote.fn(cfg, registered["version"], ev, baseline, train, {"train_digest": "7a7a7a7a"})
    assert gate["decision"] == "promoted"

    v = T.get_version(cfg.registered_model_name, registered["version"])
    # 0.40 -> 0.10 is -75.0%; ROUGE-L and KL as given
    assert {k: v.tags[k] for k in ("toxicity_before", "toxicity_after", "toxicity_change", "rouge_l", "kl",
                                   "decision")} == {
        "toxicity_before": "0.4000", "toxicity_after": "0.1000", "toxicity_change": "-75.0%", "rouge_l": "0.2900",
        "kl": "1.500", "decision": "promoted"}
    assert not [k for k in v.tags if k.startswith("metric.")]  # the full metrics live on the logged model
    assert v.metrics["eval/toxicity_mean"] == 0.10 and v.metrics["train/kl_mean"] == 1.5
    assert v.description.startswith("toxicity 0.4000 -> 0.1000 (-75.0%) | ROUGE-L 0.2900 | KL 1.500")
    assert "Gate: **promoted**" in v.description
    assert all(f"- {r}" in v.description for r in gate["reasons"])
    card = mlflow.artifacts.load_text(f"{mlflow.MlflowClient().get_logged_model(v.model_id).artifact_location}"
                                      "/model_card.md")
    for row in ("| gate decision | promoted |", "| toxicity before | 0.4000 |", "| toxicity after | 0.1000 |",
                "| base model | embedded:t5 |", f"| eval split digest | {SPLIT} |", "| train split digest | 7a7a7a7a |"):
        assert row in card, row

    # a worse challenger from the same run's model: rejected, in the same words
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run2:
            T.log_model_dir(folder)
    worse = _evaluation(0.35)
    reg2 = register_model.fn(cfg, run2, worse, {**train, "run_id": run2})
    gate2 = gate_and_promote.fn(cfg, reg2["version"], worse, baseline, {**train, "run_id": run2}, {})
    v2 = T.get_version(cfg.registered_model_name, reg2["version"])
    assert gate2["decision"] == v2.tags["decision"] == "rejected"
    assert "Gate: **rejected**" in v2.description


def test_a_decision_recorded_in_the_old_words_is_still_read(cfg, policy_and_folder):
    """A version gated before (``promotion.decision`` = ``promote``): a retry applies it, it is not re-decided."""
    from detoxflow.tasks.registry import gate_and_promote, register_model

    _, folder = policy_and_folder
    with T.parent_run(cfg, "pipeline"):
        with T.child_run("train") as run_id:
            T.log_model_dir(folder)
    train = {"run_id": run_id, "summary": {"train/kl_mean": 1.5}}
    ev = _evaluation(0.39)  # would be rejected if decided again (not 5% better than the baseline)
    version = register_model.fn(cfg, run_id, ev, train)["version"]
    T.tag_version(cfg.registered_model_name, version, {
        "promotion.reasons": "PASS old", "promotion.champion_before": "none", "promotion.champion_metrics": "none",
        "promotion.decision": "promote"})
    baseline = {"metrics": BASELINE, "split_digest": SPLIT, "settings_digest": SETTINGS}
    gate = gate_and_promote.fn(cfg, version, ev, baseline, train, {})
    assert (gate["decision"], gate["reasons"]) == ("promoted", ["PASS old"])
    assert T.get_alias(cfg.registered_model_name, T.CHAMPION).version == version


def test_the_experiment_opens_on_runs_and_the_parent_run_sorts_by_toxicity(cfg):
    from detoxflow.tasks.reporting import outcome_metrics

    exp_id = T.setup(cfg)
    assert mlflow.MlflowClient().get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    summary = {"toxicity_before": 0.4, "toxicity_after": 0.1, "relative_change": -0.75, "rouge_l_after": 0.29,
               "rouge_l_before": 0.3, "decision": "promoted", "kl": None}
    assert outcome_metrics(summary) == {"toxicity_before": 0.4, "toxicity_after": 0.1, "toxicity_change": -0.75,
                                        "rouge_l": 0.29}
    assert outcome_metrics({"settings": [], "headline": "x"}) == {}  # a sweep's result: nothing made up

"""The KL sweep: settings validation, the frontier report, and the flow end to end on a tiny random T5.

What a user relies on:
- bad settings fail before anything trains, naming the setting and the key (a setting may not change what
  the shared baseline and held-out evaluation depend on);
- the flow logs ONE MLflow parent run with a child run per setting (trained with that setting's KL, not
  another's checkpoints), writes the frontier (plots, markdown + JSON table) to the parent run and as Prefect
  artifacts, and registers and gates one version per setting, the decision readable from the version tags;
- a hacked-looking evaluation raises alarms and the gate refuses it, naming the alarm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from detoxflow.config import ConfigError, MonitorConfig, PromotionConfig, load_config
from detoxflow.tasks.sweep import (
    TAG_SETTING,
    TAG_SWEEP,
    baseline_row,
    default_settings,
    frontier_markdown,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data"

# ------------------------------------------------------------------------------------------ settings (fast)


def test_default_settings_cover_no_kl_two_fixed_and_two_adaptive_targets():
    cfg = load_config(None, ["ppo.kl.init_coef=0.2", "ppo.kl.target=6", "ppo.steps=7", "ppo.learning_rate=0.002"])
    points = resolve_settings(cfg)
    kl = [(p.cfg.ppo.kl.mode, p.cfg.ppo.kl.init_coef, p.cfg.ppo.kl.target) for p in points]
    assert ("fixed", 0.0, 6.0) in kl
    assert sorted(c for m, c, _ in kl if m == "fixed" and c > 0) == [0.05, 0.2]
    assert sorted(t for m, _, t in kl if m == "adaptive") == [3.0, 6.0]
    # only the KL differs: the budget is the config's, and every setting faces the same gate KL bound (2 x 6)
    assert {(p.cfg.ppo.steps, p.cfg.ppo.learning_rate) for p in points} == {(7, 0.002)}
    assert {p.cfg.promotion.max_kl for p in points} == {12.0}
    assert len({p.slug for p in points}) == len(points) == len(default_settings(cfg))


def test_settings_are_validated_before_anything_trains():
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match=r"setting 'greedy': cannot override generation\.do_sample.*ppo\.\*"):
        resolve_settings(cfg, [{"label": "greedy", "generation.do_sample": False}])
    with pytest.raises(ConfigError, match=r"setting 'x'.*unknown field 'ppo\.kl\.coef'"):
        resolve_settings(cfg, [{"label": "x", "ppo.kl.coef": 0.1}])
    with pytest.raises(ConfigError, match=r"setting 'neg'.*ppo\.kl\.init_coef"):
        resolve_settings(cfg, [{"label": "neg", "ppo.kl.init_coef": -1}])
    with pytest.raises(ConfigError, match=r"setting #1 'A B'.*collides with setting #0"):
        resolve_settings(cfg, [{"label": "a-b", "ppo.steps": 2}, {"label": "A B", "ppo.steps": 3}])
    with pytest.raises(ConfigError, match="settings is empty"):
        resolve_settings(cfg, [])
    # a label is optional: the overrides name the setting
    (only,) = resolve_settings(cfg, [{"ppo.kl.init_coef": 0.0, "ppo.kl.mode": "fixed"}])
    assert only.label == "ppo.kl.init_coef=0.0, ppo.kl.mode=fixed" and only.cfg.ppo.kl.init_coef == 0.0


def test_an_explicit_gate_kl_bound_is_kept_for_every_setting():
    cfg = load_config(None, ["promotion.max_kl=4.5"])
    points = resolve_settings(cfg, [{"label": "t2", "ppo.kl.target": 2.0}, {"label": "t9", "ppo.kl.target": 9.0}])
    assert [p.cfg.promotion.max_kl for p in points] == [4.5, 4.5]


def test_hacked_responses_raise_alarms_and_the_gate_refuses_naming_them():
    """The path the sweep takes for a setting: response statistics -> alarms -> gate, on text shaped like the
    unpenalised run's output (one word repeated to the length limit) against normal summaries."""
    from detoxflow.models.monitors import alarms, response_stats
    from detoxflow.models.promotion import decide

    normal = [f"#Person2# books a flight to city{i} on day{i} for {i}00 dollars and pays by card{i}." for i in range(16)]
    hacked = [f"#Person2# books a flight to {' '.join(['for'] * 30)}" for _ in range(16)]
    base, cur = response_stats(normal), response_stats(hacked)
    raised = alarms({f"eval/{k}": v for k, v in cur.items()}, {f"eval/{k}": v for k, v in base.items()}, MonitorConfig())
    assert any(a.startswith("distinct_2") for a in raised) and any(a.startswith("top_token_share") for a in raised)

    metrics = {"split_digest": "d", "eval/rouge_l": 0.5, "eval/length_mean": 20.0}
    baseline = {**metrics, "eval/toxicity_mean": 0.4}
    challenger = {**metrics, "eval/toxicity_mean": 0.05, "train/kl_mean": 1.0}  # much less toxic, all else in bounds
    decision = decide(challenger, None, baseline, PromotionConfig(), kl_target=6.0, alarms=raised)
    assert not decision.promote
    (blocked,) = [r for r in decision.reasons if r.startswith("BLOCK")]
    assert blocked.startswith(f"BLOCK monitors: {len(raised)} alarm(s): distinct_2")
    assert "top_token_share" in blocked and "monitors.max_top_token_share" in blocked


def test_frontier_markdown_lists_baseline_first_and_says_why_a_setting_was_refused():
    base = {"eval/toxicity_mean": 0.4, "eval/rouge_l": 0.6, "eval/ref_perplexity": 1.7, "eval/distinct_2": 0.38,
            "eval/length_mean": 25.0, "eval/top_token_share": 0.27}
    row = {"label": "no KL", "kl": 40.0, "kl_coef_final": 0.0, "toxicity_after": 0.07, "toxicity_drop": 0.82,
           "rouge_l": 0.3, "ref_perplexity": 58.0, "distinct_2": 0.16, "length_mean": 36.0, "top_token_share": 0.59,
           "n_alarms": 1, "alarms": ["distinct_2 0.160 dropped 58% ..."], "decision": "rejected", "version": "3",
           "blocked_by": ["ROUGE-L", "monitors"],
           "reasons": ["BLOCK ROUGE-L: 0.6 -> 0.3 (-50.0%)", "BLOCK monitors: 1 alarm(s): distinct_2 ..."]}
    md = frontier_markdown([row], base, "sweep")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| baseline (before training) | 0.00 |") and "| +0.0% |" in table[1]
    assert table[2].startswith("| no KL | 40.00 | 0 | 0.0700 | +82.0% | 0.300 | 58 | 0.160 | 36.0 | 0.590 | 1 | rejected |")
    assert "Blocked by: ROUGE-L, monitors" in md and "- alarm: distinct_2 0.160 dropped 58%" in md
    assert "- BLOCK ROUGE-L: 0.6 -> 0.3" in md
    assert baseline_row(base)["toxicity_after"] == 0.4


def test_weekly_deployment_runs_the_sweep_profile_on_a_weekly_cron(monkeypatch):
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from detoxflow.tasks.config_source import ConfigFile, resolve_config

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (weekly,) = [d for d in spec["deployments"] if (d["flow_name"], d["name"]) == ("kl_sweep", "weekly")]
    assert weekly["work_pool"]["name"] == "gpu"  # it trains in-process
    (schedule,) = weekly["schedules"]
    assert schedule["cron"] == "0 3 * * 0" and schedule["active"]
    # the file is read when the run starts: the run trains what configs/sweep.yaml says that day
    cfg, _ = resolve_config(ConfigFile.model_validate(weekly["parameters"]["cfg"]))
    assert cfg == load_config(ROOT / "configs" / "sweep.yaml")
    assert weekly["parameters"]["settings"] is None
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(weekly["entrypoint"], use_placeholder_flow=False)
    assert flow.name == "kl_sweep" and set(flow.parameters.model_dump()["properties"]) == {"cfg", "settings"}


# ------------------------------------------------------------------------------------------ the flow (tiny T5)


def write_split(src: Path, dest: Path, n: int) -> None:
    """The first n records of a shipped corpus split (the project's own text) as a split file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src.open(encoding="utf-8") as fh:
        dest.write_text("".join(next(fh) for _ in range(n)), encoding="utf-8")


SETTINGS = [
    {"label": "no KL", "ppo.kl.mode": "fixed", "ppo.kl.init_coef": 0.0},
    {"label": "adaptive 3", "ppo.kl.mode": "adaptive", "ppo.kl.target": 3.0, "ppo.kl.init_coef": 0.1},
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_models, prefect_harness) -> dict[str, Any]:
    """One sweep of 2 settings x 1 PPO step on a tiny T5, 8 train / 4 test records."""
    from detoxflow.flows.kl_sweep import kl_sweep

    if not (CORPUS / "train.jsonl").is_file():
        pytest.skip("the shipped corpus data/*.jsonl is missing")
    root = tmp_path_factory.mktemp("kl-sweep")
    write_split(CORPUS / "train.jsonl", root / "data" / "train.jsonl", 8)
    write_split(CORPUS / "test.jsonl", root / "data" / "test.jsonl", 4)
    cfg = load_config(None, [
        "name=sweeptiny", f"work_dir={root / 'work'}", f"data.source={root / 'data'}", "data.max_eval_samples=4",
        f"model.name_or_path={tiny_models['t5']}", "model.num_threads=1", "model.device=cpu", "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.steps=1", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "ppo.learning_rate=0.01",
        "eval.k_samples=2", "eval.batch_size=8", "eval.bootstrap_samples=100", "eval.n_table_samples=3",
        f"tracking.uri=sqlite:///{root / 'work' / 'mlflow.db'}",
    ])
    production = _production_champion(cfg, root)
    state = kl_sweep(cfg, SETTINGS, return_state=True)
    assert state.is_completed(), state.message
    return {"cfg": cfg, "state": state, "result": state.result(), "production": production}


def _production_champion(cfg, root: Path) -> dict[str, Any]:
    """The pipeline's registered model with a champion and a challenger (version 1), as a team has it before
    someone runs a sweep: what the sweep must leave alone."""
    from detoxflow import tracking

    folder = root / "production-model"
    folder.mkdir()
    (folder / "detoxflow.json").write_text("{}")
    tracking.setup(cfg)
    with tracking.parent_run(cfg, "pipeline"):
        with tracking.child_run("train") as run_id:
            tracking.log_dir(folder, "model")
        version = tracking.register_model(cfg, run_id, metrics={"eval/toxicity_mean": 0.9})
    tracking.set_champion(cfg.registered_model_name, version)
    return _aliases(cfg.registered_model_name)


def _aliases(name: str) -> dict[str, Any]:
    from detoxflow import tracking

    return {"versions": [v.version for v in tracking.list_versions(name)],
            **{a: getattr(tracking.get_alias(name, a), "version", None) for a in (tracking.CHAMPION, tracking.CHALLENGER)}}


def _client(cfg):
    import mlflow

    from detoxflow import tracking

    tracking.setup(cfg)
    return mlflow.MlflowClient()  # the current tracking URI, as tracking.setup set it


@pytest.mark.slow
def test_one_parent_run_with_a_child_run_per_setting(sweep):
    cfg, result = sweep["cfg"], sweep["result"]
    cli = _client(cfg)
    parent_id = result["mlflow"]["parent_run_id"]
    parent = cli.get_run(parent_id)
    assert parent.data.tags[TAG_SWEEP] == "kl_sweep" and "mlflow.parentRunId" not in parent.data.tags
    exp = parent.info.experiment_id
    sweeps = cli.search_runs([exp], filter_string=f"tags.`{TAG_SWEEP}` = 'kl_sweep'")
    assert [r.info.run_id for r in sweeps] == [parent_id]
    children = cli.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_setting = {r.data.tags[TAG_SETTING]: r for r in children if TAG_SETTING in r.data.tags}
    assert set(by_setting) == {"no KL", "adaptive 3"}
    assert {r.data.tags.get("detoxflow.stage") for r in children} >= {"prepare", "baseline"}

    rows = {r["label"]: r for r in result["settings"]}
    for label, run in by_setting.items():
        # each child trained with its own KL setting and holds its own model, training curve and evaluation
        assert run.info.status == "FINISHED"
        assert rows[label]["run_id"] == run.info.run_id
        assert run.data.metrics["train/kl_mean"] == pytest.approx(rows[label]["kl"])
        assert run.data.metrics["eval/toxicity_mean"] == pytest.approx(rows[label]["toxicity_after"])
        arts = {a.path for a in cli.list_artifacts(run.info.run_id)}
        assert {"eval", "train", "sweep"} <= arts
        assert cli.get_logged_model(run.outputs.model_outputs[0].model_id).source_run_id == run.info.run_id
        # the exaggeration probe is logged per training step and measured on the held-out responses
        assert len(cli.get_metric_history(run.info.run_id, "env/exaggeration_share")) == cfg.ppo.steps
        assert "eval/exaggeration_share" in run.data.metrics
    assert by_setting["no KL"].data.params["sweep.ppo.kl.init_coef"] == "0.0"
    assert by_setting["no KL"].data.metrics["objective/kl_coef"] == 0.0
    assert by_setting["adaptive 3"].data.metrics["objective/kl_coef"] == pytest.approx(0.1)
    assert by_setting["adaptive 3"].data.params["ppo.kl.target"] == "3.0"
    # separate checkpoint folders: the second setting did not resume the first one's training
    ckpts = sorted((Path(cfg.work_dir) / "runs" / parent_id).glob("*/train/checkpoints/step-1"))
    assert len(ckpts) == 2


@pytest.mark.slow
def test_frontier_artifacts_in_mlflow_and_prefect(sweep):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    cfg, result = sweep["cfg"], sweep["result"]
    cli = _client(cfg)
    parent_id = result["mlflow"]["parent_run_id"]
    logged = {a.path for folder in ("plots", "sweep") for a in cli.list_artifacts(parent_id, folder)}
    assert {"plots/kl_frontier.png", "plots/sweep_panels.png", "plots/sweep_curves.png",
            "sweep/frontier.json", "sweep/frontier.md", "sweep/summary.json"} <= logged
    for name in ("kl_frontier", "sweep_panels", "sweep_curves"):
        assert Path(result["files"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(Path(result["files"]["frontier_json"]).read_text())
    assert [r["label"] for r in table["settings"]] == ["no KL", "adaptive 3"]
    assert table["baseline"]["toxicity_after"] == pytest.approx(result["baseline"]["eval/toxicity_mean"])
    for rows in table["samples"].values():
        assert len(rows) == 3 and {"response_before", "response_after", "toxicity_before"} <= set(rows[0])
    md = Path(result["files"]["frontier_md"]).read_text()
    assert "| baseline (before training) |" in md and "| no KL |" in md and "| adaptive 3 |" in md

    flow_run_id = sweep["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in arts if a.key}
    assert by_key["kl-sweep-sweeptiny"].type == "table"
    assert by_key["kl-sweep-sweeptiny-report"].type == "markdown"
    assert {"kl-sweep-sweeptiny-kl-frontier", "kl-sweep-sweeptiny-sweep-panels", "kl-sweep-sweeptiny-sweep-curves"} <= set(by_key)
    assert by_key["kl-sweep-sweeptiny-kl-frontier"].type == "image"
    assert {"kl-sweep-samples-sweeptiny-no-kl", "kl-sweep-samples-sweeptiny-adaptive-3"} <= set(by_key)


@pytest.mark.slow
def test_each_setting_is_registered_and_gated(sweep):
    from detoxflow import tracking

    cfg, result = sweep["cfg"], sweep["result"]
    _client(cfg)
    assert result["registered_model"] == "detoxflow-sweeptiny-sweep"  # its own, never the pipeline's
    versions = {v.version: v for v in tracking.list_versions("detoxflow-sweeptiny-sweep")}
    rows = result["settings"]
    assert sorted(r["version"] for r in rows) == sorted(versions) and len(versions) == 2
    for row in rows:
        v = versions[row["version"]]
        assert v.run_id == row["run_id"]  # the version is the setting's own trained model
        assert v.tags["decision"] == row["decision"] and row["decision"] in ("promoted", "rejected")
        assert v.tags["promotion.reasons"].splitlines() == row["reasons"]
        assert float(v.tags["toxicity_after"]) == pytest.approx(row["toxicity_after"], abs=5e-5)
        assert f"Gate: **{row['decision']}**" in v.description
        if row["alarms"]:
            assert not row["decision"] == "promoted"
            assert "BLOCK monitors" in v.tags["promotion.reasons"]
    assert result["promoted"] == [r["label"] for r in rows if r["decision"] == "promoted"]


@pytest.mark.slow
def test_a_sweep_never_moves_the_production_aliases(sweep):
    """The pipeline's model keeps its versions, champion and challenger, whatever the sweep promoted."""
    cfg, result = sweep["cfg"], sweep["result"]
    _client(cfg)
    assert sweep["production"] == {"versions": ["1"], "champion": "1", "challenger": "1"}
    assert _aliases(cfg.registered_model_name) == sweep["production"]
    # the sweep did move aliases, in its own model: challenger on its last version, champion where it promoted
    own = _aliases("detoxflow-sweeptiny-sweep")
    assert own["challenger"] == max(own["versions"], key=int) and len(own["versions"]) == 2
    assert own["champion"] == result["champion"]


def test_sweep_registers_into_its_own_model():
    """Every setting's config names the sweep's registered model (also when the config names one)."""
    from detoxflow.tasks.sweep import sweep_model_name

    cfg = load_config(None, [])
    assert {p.cfg.registered_model_name for p in resolve_settings(cfg)} == {"detoxflow-default-sweep"}
    named = load_config(None, ["tracking.registered_model=team-detox"])
    assert {p.cfg.registered_model_name for p in resolve_settings(named)} == {"team-detox-sweep"}
    assert sweep_model_name(resolve_settings(named)[0].cfg) == "team-detox-sweep"


def test_sweep_plots_draw_panels_with_thresholds_and_curves(tmp_path):
    """The sweep's two extra plots write non-blank PNGs, tolerate a missing metric and reject empty input."""
    from matplotlib.image import imread

    from detoxflow.models import plots

    base = {"rouge_l": 0.6, "ref_perplexity": 1.7, "distinct_2": 0.38, "length_mean": 25.0, "top_token_share": 0.27}
    points = [
        {"label": "no KL", "kl": 40.0, "status": "alarmed", "toxicity_drop": 0.8, "rouge_l": 0.3,
         "ref_perplexity": 58.0, "distinct_2": 0.16, "length_mean": 36.0, "top_token_share": 0.59},
        {"label": "adaptive 4", "kl": 3.5, "status": "promoted", "toxicity_drop": 0.3, "rouge_l": 0.55,
         "ref_perplexity": 2.1, "distinct_2": 0.35},  # no length / top share: a gap, not an error
    ]
    thresholds = {"ref_perplexity": 3.0, "distinct_2": 0.3, "length_mean": 0.5, "top_token_share": 0.5}
    for path in (plots.sweep_panels(points, base, tmp_path / "panels.png", thresholds),
                 plots.sweep_curves({"no KL": [{"objective/scores": 0.1 * i, "objective/kl": 2.0 * i} for i in range(5)],
                                     "adaptive 4": [{"objective/scores": 0.05 * i} for i in range(5)]},
                                    tmp_path / "curves.png")):
        img = imread(path)
        assert img.shape[1] >= 1000 and img[..., :3].std() > 0.05
    assert plots._threshold_lines("band", 20.0, 0.5) == [10.0, 30.0]
    assert plots._threshold_lines("drop", 0.4, 0.25) == pytest.approx([0.3])
    with pytest.raises(ValueError, match="no points"):
        plots.sweep_panels([], base, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"point #0 \(a\) lacks kl"):
        plots.sweep_panels([{"label": "a"}], base, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no training histories"):
        plots.sweep_curves({"a": []}, tmp_path / "x.png")


@pytest.mark.slow
def test_cli_sweep_settings_file_must_be_a_list_and_bad_settings_fail_before_training(tmp_path):
    """`detoxflow sweep --settings FILE`: a non-list file or a bad setting exits 2 with the reason, nothing trained."""
    import os
    import subprocess
    import sys

    def cli(settings: str) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "settings.yaml"
        f.write_text(settings, encoding="utf-8")
        return subprocess.run([sys.executable, "-m", "detoxflow.cli", "sweep", "--config", str(ROOT / "configs" / "sweep.yaml"),
                               "--settings", str(f)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DETOXFLOW_WORK_DIR": str(tmp_path / "work"),
                                   "PREFECT_HOME": str(tmp_path / "prefect")})

    r = cli("label: x\n")
    assert r.returncode == 2 and "expected a YAML list of settings, got dict" in r.stderr, r.stderr[-2000:]
    r = cli("- {label: greedy, generation.do_sample: false}\n")
    assert r.returncode == 2 and "cannot override generation.do_sample" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "work").glob("runs/*/*/train"))

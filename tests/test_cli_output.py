"""A terminal a person reads: what the console shows by default and with -v, the closing summary table, the links
to the results, `detoxflow ui`, and (slow) a default `detoxflow run` end to end: at most 25 lines besides its
progress bars, none with "Warning" or "Traceback", a table whose figures are the run's own."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from detoxflow import terminal, ui
from detoxflow.errors import InputError

PROJECT = Path(__file__).resolve().parent.parent
PREFECT_DIR = Path(str(importlib.util.find_spec("prefect").origin)).parent  # type: ignore[union-attr]
BARS = re.compile(r"^\s*(ppo|evaluate|bootstrap \w+):")
SMALL = ["ppo.steps=3", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "generation.max_new_tokens=8",
         "data.max_train_samples=16", "data.max_eval_samples=8", "model.num_threads=1", "eval.k_samples=1",
         "eval.bootstrap_samples=100"]


def record(name: str, level: int, msg: str, pathname: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_default_console_shows_the_flows_lines_and_own_warnings_once() -> None:
    f = terminal.ConsoleFilter()
    ours = str(PROJECT / "tasks" / "stages.py")
    engine = str(PREFECT_DIR / "flow_engine.py")
    assert f.filter(record("prefect.flow_runs", logging.INFO, "stage train: done in 3.0 s", ours))
    assert not f.filter(record("prefect.flow_runs", logging.INFO, "Finished in state Completed()", engine))
    assert not f.filter(record("prefect.task_runs", logging.INFO, "prepared 16 train / 8 eval records", ours))
    assert not f.filter(record("detoxflow.models.policy", logging.INFO, "forward path: fast path", ours))
    assert not f.filter(record("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables", "x"))
    assert not f.filter(record("py.warnings", logging.WARNING, "FutureWarning: is_gradient_checkpointing", "x"))
    # a warning of ours: shown once per message template (the trainer's early stop repeats every few steps)
    early = "step %d: approx-KL %.3f > %.3f, stopping this step's PPO epochs early"
    assert f.filter(record("detoxflow.models.trainer", logging.WARNING, early, ours))
    assert not f.filter(record("detoxflow.models.trainer", logging.WARNING, early, ours))
    assert f.filter(record("detoxflow.models.prompts", logging.WARNING, "prompt cut", ours))
    assert f.filter(record("anything.else", logging.ERROR, "boom", "x"))  # errors always


def _console_output(verbose: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        terminal.configure(verbose)
        logging.getLogger("detoxflow.models.trainer").warning("step %d: approx-KL", 6)
        logging.getLogger("detoxflow.models.trainer").warning("step %d: approx-KL", 9)
        logging.getLogger("somelib.module").warning("third-party detail")  # a logger no library configures
        logging.getLogger("detoxflow.tracking").info("MLflow run abc")
    finally:
        for h in list(root.handlers):
            if getattr(h, "_detoxflow", False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return buf.getvalue()


def test_verbose_shows_every_line_with_its_level_and_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _console_output(False, monkeypatch).splitlines() == ["! step 6: approx-KL"]
    assert _console_output(True, monkeypatch).splitlines() == [
        "WARNING detoxflow.models.trainer: step 6: approx-KL", "WARNING detoxflow.models.trainer: step 9: approx-KL",
        "WARNING somelib.module: third-party detail", "INFO detoxflow.tracking: MLflow run abc"]


SUMMARY = {
    "toxicity_before": 0.37444, "toxicity_after": 0.13714, "relative_change": -0.63375,
    "relative_change_ci": [-0.76980, -0.47861], "rouge_l_before": 0.79815, "rouge_l_after": 0.76297, "kl": 8.3621,
    "decision": "rejected", "registered_model": "detoxflow-default", "version": "3",
    "reasons": ["PASS toxicity vs baseline: 0.3744 -> 0.1371 (-63.4%)", "BLOCK KL: 14.1 nats, allowed at most 12"],
    "alarms": [], "mlflow": {"tracking_uri": "sqlite:////h/mlflow.db", "experiment_id": "4", "parent_run_id": "r1"},
}


def test_summary_table_figures_colours_and_links() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=True, color_system="standard")
    terminal.print_table(console, terminal.summary_table(SUMMARY, terminal.run_links(SUMMARY, env={})))
    text = buf.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    # (0.13714 - 0.37444) / 0.37444 = -63.4%; (0.76297 - 0.79815) / 0.79815 = -4.4%
    assert re.search(r"toxicity\s+0\.3744\s+0\.1371\s+-63\.4% \(95% CI -77\.0% … -47\.9%\)", plain), plain
    assert re.search(r"ROUGE-L\s+0\.798\s+0\.763\s+-4\.4%", plain), plain
    assert re.search(r"KL \(nats\)\s+8\.36", plain) and "detoxflow-default v3: rejected" in plain
    assert "\x1b[32m  PASS toxicity vs baseline" in text and "\x1b[31m  BLOCK KL" in text  # green / red rows
    assert "MLflow run (after `detoxflow ui`): http://127.0.0.1:5000/#/experiments/4/runs/r1" in plain
    team = {**SUMMARY, "mlflow": {**SUMMARY["mlflow"], "tracking_uri": "http://mlflow.lab:5000/"}}
    assert terminal.run_links(team, env={"PREFECT_API_URL": "http://prefect.lab:4200/api"}) == [
        ("MLflow run", "http://mlflow.lab:5000/#/experiments/4/runs/r1"), ("Prefect UI", "http://prefect.lab:4200")]


def _render(table) -> tuple[str, str]:
    """(the ANSI text, the plain text) of a closing table printed on a 160-column colour terminal."""
    buf = io.StringIO()
    terminal.print_table(Console(file=buf, width=160, force_terminal=True, color_system="standard"), table)
    return buf.getvalue(), re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())


LOCAL = {"tracking_uri": "sqlite:////h/mlflow.db", "experiment_id": "4"}


def test_train_table_shows_the_training_summary_model_and_link() -> None:
    result = {"run_id": "a1b2", "model_uri": "runs:/a1b2/model", "steps": 25, "artifact_dir": "/x",
              "summary": {"train/steps": 25.0, "train/kl_mean": 2.71828, "train/scores_mean": 0.61234,
                          "train/toxicity_mean": 0.18761, "train/kl_coef": 0.05},
              "mlflow": {**LOCAL, "parent_run_id": "a1b2"}}
    _, plain = _render(terminal.train_table(result, terminal.run_links(result, env={})))
    assert "train run a1b2" in plain
    for label, value in (("steps done", "25"), ("score", "0.6123"), ("toxicity of training samples", "0.1876"),
                         ("KL to the reference", "2.718"), ("KL coefficient", "0.0500")):
        assert re.search(rf"^{label}.*\s{re.escape(value)}\s*$", plain, re.M), (label, plain)
    assert "model: runs:/a1b2/model" in plain
    assert "http://127.0.0.1:5000/#/experiments/4/runs/a1b2" in plain


def test_evaluate_table_shows_before_after_with_ci_quality_and_alarms() -> None:
    result = {"model_uri": "models:/detoxflow-default/3", "toxicity_before": 0.37444, "toxicity_after": 0.13714,
              "relative_change": -0.63375, "relative_change_ci": [-0.76980, -0.47861], "n_eval": 64,
              "alarms": ["length: responses 25% shorter"],
              "metrics": {"eval/toxicity_mean": 0.13714, "eval/expected_max_toxicity": 0.3, "eval/rouge_l": 0.76297,
                          "eval/length_mean": 30.0},
              "baseline_metrics": {"eval/toxicity_mean": 0.37444, "eval/expected_max_toxicity": 0.5,
                                   "eval/rouge_l": 0.79815, "eval/length_mean": 40.0},
              "mlflow": {**LOCAL, "parent_run_id": "e9"}}
    text, plain = _render(terminal.evaluate_table(result, terminal.run_links(result, env={})))
    assert "evaluate models:/detoxflow-default/3 on 64 held-out prompts" in plain
    assert re.search(r"toxicity\s+0\.3744\s+0\.1371\s+-63\.4% \(95% CI -77\.0% … -47\.9%\)", plain), plain
    # (0.3 - 0.5) / 0.5 = -40%; (0.76297 - 0.79815) / 0.79815 = -4.4%; (30 - 40) / 40 = -25%
    assert re.search(r"expected max toxicity\s+0\.5000\s+0\.3000\s+-40\.0%", plain), plain
    assert re.search(r"ROUGE-L\s+0\.798\s+0\.763\s+-4\.4%", plain), plain
    assert re.search(r"length \(tokens\)\s+40\.0\s+30\.0\s+-25\.0%", plain), plain
    assert "\x1b[33m  alarm: length: responses 25% shorter" in text  # yellow
    assert "http://127.0.0.1:5000/#/experiments/4/runs/e9" in plain


def test_promote_table_colours_the_decision_and_each_rule_and_names_the_aliases() -> None:
    reasons = ["PASS toxicity vs baseline: 0.3744 -> 0.1371 (-63.4%)", "BLOCK KL: 14.1 nats, allowed at most 12"]
    result = {"promote": False, "decision": "rejected", "reasons": reasons, "version": "4",
              "champion_before": "2", "champion_after": "2", "registered_model": "detoxflow-default",
              "aliases": ["challenger"], "toxicity_before": 0.37444, "toxicity_after": 0.13714,
              "relative_change": -0.63375, "relative_change_ci": [-0.76980, -0.47861], "alarms": [],
              "mlflow": {**LOCAL, "parent_run_id": "p7"}}
    text, plain = _render(terminal.promote_table(result, terminal.run_links(result, env={})))
    assert "detoxflow-default v4: rejected" in plain and "\x1b[1;31mrejected" in text  # bold red
    assert "\x1b[32m  PASS toxicity vs baseline" in text and "\x1b[31m  BLOCK KL: 14.1 nats" in text
    assert "aliases of v4: challenger; champion: v2 -> v2" in plain
    assert re.search(r"toxicity\s+0\.3744\s+0\.1371\s+-63\.4%", plain), plain
    promoted = {**result, "decision": "promoted", "promote": True, "champion_before": None, "champion_after": "4",
                "aliases": ["challenger", "champion"], "reasons": reasons[:1]}
    text, plain = _render(terminal.promote_table(promoted, []))
    assert "\x1b[1;32mpromoted" in text  # bold green
    assert "aliases of v4: challenger, champion; champion: none -> v4" in plain


def test_sweep_headline_reads_as_a_change() -> None:
    from detoxflow.tasks.sweep import sweep_headline

    rows = [{"label": "no KL", "kl": 9.5, "toxicity_drop": 0.634, "rouge_l": 0.71, "n_alarms": 2, "decision": "rejected"},
            {"label": "fixed 0.5", "kl": 1.2, "toxicity_drop": -0.029, "rouge_l": 0.8, "n_alarms": 0,
             "decision": "rejected"}]
    head = sweep_headline(rows)
    assert "no KL: KL 9.50, toxicity -63.4%," in head  # 63.4% less toxic
    assert "fixed 0.5: KL 1.20, toxicity +2.9%," in head  # 2.9% more toxic
    assert "less" not in head


def test_ui_plan_local_store_team_links_and_missing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DETOXFLOW_HOME", str(tmp_path))
    with pytest.raises(InputError, match=f"no MLflow store at {tmp_path / 'mlflow.db'}"):
        ui.plan(5123, env={})
    (tmp_path / "mlflow.db").touch()
    p = ui.plan(5123, env={})
    assert p.command is not None and p.links == [("MLflow UI", "http://127.0.0.1:5123")]
    args = p.command[p.command.index("ui") + 1:]
    assert dict(zip(args[::2], args[1::2], strict=True)) == {
        "--workers": "1", "--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "--host": "127.0.0.1", "--port": "5123",
        "--artifacts-destination": str(tmp_path / "mlartifacts")}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    p = ui.plan(5123, env={"PREFECT_API_URL": "http://prefect.lab:4200/api"})
    assert p.command is None
    assert p.links == [("MLflow UI", "http://mlflow.lab:5000"), ("Prefect UI", "http://prefect.lab:4200")]


# ------------------------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counted_lines(text: str) -> list[str]:
    """Lines a person reads: each line's final state after carriage returns, progress bars left out."""
    out = []
    for line in text.split("\n"):
        last = line.split("\r")[-1]
        if last.strip() and not BARS.match(last):
            out.append(last)
    return out


@pytest.mark.slow
def test_default_run_prints_a_table_in_at_most_25_lines(tmp_path: Path, prefect_harness) -> None:
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR")}
    env |= {"DETOXFLOW_HOME": str(home), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "MLFLOW_LOGGING_LEVEL", "PYTHONWARNINGS",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "PREFECT_LOGGING_LEVEL"):
        env.pop(var, None)  # what a user's shell has: the CLI itself must quieten them
    sets = [a for s in SMALL for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "detoxflow.cli", "run", *sets], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    everything = proc.stdout + proc.stderr
    lines = counted_lines(proc.stderr) + counted_lines(proc.stdout)
    assert len(lines) <= 25, "\n".join(lines)
    for word in ("Warning", "Traceback", "Loading weights", "Downloading artifacts", "INFO"):
        assert word not in everything, everything[-3000:]
    assert not (tmp_path / ".detoxflow").exists()  # state went to the home, not where the command stood

    # the table's figures are the run's own, read back from its MLflow store
    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiments = [e.experiment_id for e in store.search_experiments()]
    (parent,) = [r for r in store.search_runs(experiments, max_results=50) if "mlflow.parentRunId" not in r.data.tags]
    summary = json.loads(Path(store.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))).read_text())
    out = proc.stdout
    assert re.search(rf"toxicity\s+{summary['toxicity_before']:.4f}\s+{summary['toxicity_after']:.4f}\s", out), out
    assert f"{summary['registered_model']} v{summary['version']}: {summary['decision']}" in out
    for reason in summary["reasons"]:
        assert reason.split(":")[0] in out
    exp = parent.info.experiment_id
    assert f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{parent.info.run_id}" in out.replace("\n", "")

    # a missing alias is named with the ones there are, at once; doctor finds the store healthy
    cli = [sys.executable, "-m", "detoxflow.cli"]
    model = store.get_registered_model(summary["registered_model"])
    miss = subprocess.run([*cli, "generate", "--model", f"models:/{model.name}@nope", "hi"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert miss.returncode == 2 and f"aliases: {', '.join(sorted(model.aliases))}" in miss.stderr, miss.stderr
    env.pop("PREFECT_API_URL")
    doc = subprocess.run([*cli, "doctor"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert doc.returncode == 0 and "1 registered model(s)" in doc.stdout, doc.stdout + doc.stderr

    # `detoxflow ui` serves this store: the run is there through its REST API
    port = _free_port()
    proc_ui = subprocess.Popen([*cli, "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc_ui.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith("MLflow UI: "):
                break
        assert seen and seen[-1].strip() == f"MLflow UI: http://127.0.0.1:{port}", "".join(seen)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={parent.info.run_id}"
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - our own local UI
            assert json.loads(resp.read())["run"]["info"]["run_id"] == parent.info.run_id
    finally:
        proc_ui.send_signal(signal.SIGINT)
        proc_ui.wait(timeout=30)


def invoke(*args: str):
    """``detoxflow ARGS`` in this process (no interpreter start-up per command); the console handler it adds is
    taken off again."""
    from typer.testing import CliRunner

    from detoxflow.cli import app

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def no_json(text: str) -> None:
    assert not text.lstrip().startswith(("{", "[")) and '"toxicity_before":' not in text, text


def json_and_table(*args: str) -> tuple[dict, str]:
    """``detoxflow ARGS --json`` parsed, and the stdout of ``detoxflow ARGS`` (checked to hold no JSON)."""
    as_json = invoke(*args, "--json")
    assert as_json.exit_code == 0, as_json.stderr[-3000:] + repr(as_json.exception)
    table = invoke(*args)
    assert table.exit_code == 0, table.stderr[-3000:] + repr(table.exception)
    no_json(table.stdout)
    return json.loads(as_json.stdout), table.stdout


def _row(label: str, *values: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(label)}\s+" + r"\s+".join(re.escape(v) for v in values) + r"(\s|$)", re.M)


@pytest.mark.slow
def test_train_evaluate_promote_print_a_table_and_json_only_with_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness
) -> None:
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from detoxflow import tracking
    from detoxflow.config import load_config

    home = tmp_path / "home"
    for var in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DETOXFLOW_HOME", str(home))
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    monkeypatch.chdir(tmp_path)
    sets = [a for s in SMALL for a in ("--set", s)]
    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")

    # train: the table's figures are the run's own result, as the run recorded it in MLflow
    train = invoke("train", *sets)
    assert train.exit_code == 0, train.stderr[-3000:] + repr(train.exception)
    no_json(train.stdout)
    (run,) = store.search_runs([e.experiment_id for e in store.search_experiments()])
    run_id = run.info.run_id
    result = json.loads(Path(store.download_artifacts(run_id, "train/result.json", str(tmp_path))).read_text())
    s = result["summary"]
    assert f"train run {run_id}" in train.stdout
    assert _row("steps done", str(result["steps"])).search(train.stdout), train.stdout
    assert _row("score (last fifth)", f"{s['train/scores_mean']:.4f}").search(train.stdout), train.stdout
    assert _row("toxicity of training samples (last fifth)", f"{s['train/toxicity_mean']:.4f}").search(train.stdout)
    assert _row("KL to the reference, nats (last fifth)", f"{s['train/kl_mean']:.3f}").search(train.stdout)
    assert f"model: runs:/{run_id}/model" in train.stdout
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}" in train.stdout.replace("\n", "")

    # evaluate: --json parses, and the table shows the same figures
    model = f"runs:/{run_id}/model"
    ev, table = json_and_table("evaluate", "--model", model, *sets)
    before, after = ev["baseline_metrics"], ev["metrics"]
    rel = (ev["toxicity_after"] - ev["toxicity_before"]) / ev["toxicity_before"]
    assert ev["toxicity_before"] == before["eval/toxicity_mean"] and ev["relative_change"] == pytest.approx(rel)
    assert _row("toxicity", f"{ev['toxicity_before']:.4f}", f"{ev['toxicity_after']:.4f}",
                f"{ev['relative_change'] * 100:+.1f}%").search(table), table
    assert _row("ROUGE-L", f"{before['eval/rouge_l']:.3f}", f"{after['eval/rouge_l']:.3f}").search(table)
    assert _row("length (tokens)", f"{before['eval/length_mean']:.1f}", f"{after['eval/length_mean']:.1f}").search(
        table), table

    # promote: a version of that run, gated; --json and the table agree on the decision, rules and aliases
    cfg = load_config(None, SMALL)
    version = tracking.register_model(cfg, run_id, metrics=s)
    uri = f"models:/{cfg.registered_model_name}/{version}"
    gate, table = json_and_table("promote", "--model", uri, *sets)
    assert gate["decision"] in ("promoted", "rejected") and gate["version"] == version
    assert f"{cfg.registered_model_name} v{version}: {gate['decision']}" in table
    registered = store.get_model_version(cfg.registered_model_name, version)
    assert gate["aliases"] == sorted(registered.aliases) and "challenger" in gate["aliases"]
    assert f"aliases of v{version}: {', '.join(gate['aliases'])}" in table
    assert ("champion" in gate["aliases"]) == (gate["decision"] == "promoted")
    for reason in gate["reasons"]:
        assert reason.split(":")[0] in table
    assert _row("toxicity", f"{gate['toxicity_before']:.4f}", f"{gate['toxicity_after']:.4f}").search(table)

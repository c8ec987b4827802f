"""Reliability, bad input and environment (issue 17, rows 4-8, 10, 11): preflight before anything is written,
one line per user error with exit 2 (input) or 3 (environment), long prompts, read-only commands.

Each test runs the `detoxflow` command as a user would, in a fresh folder, and checks what the user relies on:
the exit code, the one line printed, the wall time, and what is (not) on disk or in MLflow afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT = PROJECT / "configs" / "default.yaml"
SMALL = ["--set", "ppo.steps=2", "--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=2",
         "--set", "data.max_eval_samples=4", "--set", "data.max_train_samples=16"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", "DETOXFLOW_FAULT", "PREFECT_API_URL")}
    env.update(extra)
    return env


def detoxflow(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI in ``cwd``; returns the process and its wall time in seconds."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "detoxflow.cli", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = error_lines(proc)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before  # no .detoxflow/, mlflow.db, mlruns/, mlartifacts/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bad_utf8_jsonl(path: Path, bad_line: int = 10, lines: int = 12) -> Path:
    with path.open("wb") as f:
        for i in range(1, lines + 1):
            if i == bad_line:
                f.write(b'{"id": "x", "dialogue": "\xff\xfe", "summary": "s"}\n')
            else:
                f.write((json.dumps({"id": str(i), "dialogue": f"#Person1#: hello {i}", "summary": "hi"}) + "\n").encode())
    return path


# ------------------------------------------------------------------------------------------ preflight (rows 4, 5, 6)


def test_empty_config_file_is_refused_in_seconds_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing here\n\n")
    before = {p.name for p in tmp_path.iterdir()}
    proc, wall = detoxflow(["run", "-c", "empty.yaml"], tmp_path, timeout=30)
    assert_one_line(proc, 2, "empty.yaml", "empty")
    assert wall < 5
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.name_or_path=/nonexistent", "model.name_or_path '/nonexistent'"),
        ("data.source=/nonexistent.jsonl", "data.source '/nonexistent.jsonl'"),
        ("data.source=x.txt", "x.txt"),
        ("reward.callable=no_such_pkg_17.scorers:toxicity", "module 'no_such_pkg_17.scorers' not found"),
    ],
)
def test_bad_input_fails_preflight_with_one_line(tmp_path: Path, override: str, named: str) -> None:
    (tmp_path / "x.txt").write_text("not a dataset\n")
    before = {p.name for p in tmp_path.iterdir()}
    extra = ["--set", "reward.kind=callable"] if override.startswith("reward.") else []
    proc, wall = detoxflow(["run", "-c", str(DEFAULT), "--set", override, *extra], tmp_path, timeout=60)
    assert_one_line(proc, 2, named)
    assert wall < 5
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "-c", str(DEFAULT)],
        ["sweep", "-c", str(DEFAULT)],
        ["evaluate", "-c", str(DEFAULT), "--model", "models:/detoxflow-default@champion"],
        ["promote", "-c", str(DEFAULT), "--model", "models:/detoxflow-default@challenger"],
    ],
)
def test_every_pipeline_command_runs_preflight(tmp_path: Path, command: list[str]) -> None:
    before = {p.name for p in tmp_path.iterdir()}
    proc, wall = detoxflow([*command, "--set", "data.source=/nonexistent.jsonl"], tmp_path, timeout=60,
                           MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/store/mlflow.db")
    if command[0] in ("evaluate", "promote"):  # the model URI is checked first: no store in this folder
        assert_one_line(proc, 2, "no tracking store", "mlflow.db")
    else:
        assert_one_line(proc, 2, "data.source '/nonexistent.jsonl'")
    assert wall < 5
    assert_nothing_written(tmp_path, before)


def test_data_file_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    bad = bad_utf8_jsonl(tmp_path / "dialogs.jsonl")
    before = {p.name for p in tmp_path.iterdir()}
    proc, wall = detoxflow(["run", "-c", str(DEFAULT), "--set", f"data.source={bad}"], tmp_path, timeout=60)
    assert_one_line(proc, 2, str(bad), "line 10", "UTF-8")
    assert wall < 5
    assert_nothing_written(tmp_path, before)
    # the reader itself (data inspect, a team worker) names the line too, not a bare UnicodeDecodeError
    proc, _ = detoxflow(["data", "inspect", "-c", str(DEFAULT), "--set", f"data.source={bad}"], tmp_path, timeout=120)
    assert_one_line(proc, 2, str(bad), "line 10", "UTF-8")


def test_csv_not_utf8_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "d.csv"
    bad.write_bytes(b"id,dialogue,summary\n1,hello,hi\n2,\"two\nlines\",hi\n3,caf\xe9,hi\n")
    proc, _ = detoxflow(["run", "-c", str(DEFAULT), "--set", f"data.source={bad}"], tmp_path, timeout=60)
    assert_one_line(proc, 2, str(bad), "line 5")


# ------------------------------------------------------------------------------------------ tracking server (row 8)


@pytest.mark.parametrize("how", ["env", "override"])
def test_unreachable_tracking_server_exits_3_within_5_s(tmp_path: Path, how: str) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    before = {p.name for p in tmp_path.iterdir()}
    args = ["run", "-c", str(DEFAULT)]
    env: dict[str, str] = {}
    if how == "env":
        env["MLFLOW_TRACKING_URI"] = uri
    else:
        args += ["--set", f"tracking.uri={uri}"]
    proc, wall = detoxflow(args, tmp_path, timeout=60, **env)
    assert_one_line(proc, 3, uri, "does not answer")
    assert wall < 5
    assert_nothing_written(tmp_path, before)


def test_mlflow_http_retries_are_bounded_for_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI bounds MLflow's own HTTP retries, under the names the installed MLflow reads."""
    from mlflow import environment_variables as mev

    from detoxflow import cli

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    cli._setup_env()
    retries, backoff = mev.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), mev.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    # urllib3's backoff: factor * 2**(n-1) seconds before retry n; MLflow's defaults (7, 2) wait minutes
    assert retries <= 3
    assert sum(backoff * 2 ** n for n in range(retries)) <= 10
    assert mev.MLFLOW_HTTP_REQUEST_TIMEOUT.get() <= 30


# ------------------------------------------------------------------------------------------ one line (row 7, 11)


def test_error_table_maps_classes_to_exit_codes() -> None:
    from detoxflow.config import ConfigError
    from detoxflow.errors import exit_code, one_line
    from detoxflow.models.data import DataError

    assert exit_code(ConfigError("x")) == 2
    assert exit_code(DataError("x")) == 2
    assert exit_code(OSError(errno.ENOSPC, "No space left on device", "/w/ckpt")) == 3
    assert "disk full at /w/ckpt" in one_line(OSError(errno.ENOSPC, "No space left on device", "/w/ckpt"))
    assert exit_code(RuntimeError("a bug")) is None
    try:
        try:
            raise DataError("bad row")
        except DataError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert exit_code(outer) == 2
        assert one_line(outer) == "bad row"


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    proc, _ = detoxflow(["--debug", "run", "-c", "empty.yaml"], tmp_path, timeout=30)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_generate_bad_max_new_tokens_is_one_line(tmp_path: Path) -> None:
    proc, wall = detoxflow(["generate", "hello", "--model", "models:/detoxflow-default@champion",
                            "--max-new-tokens", "0"], tmp_path, timeout=60)
    assert_one_line(proc, 2, "--max-new-tokens 0", "greater than or equal to 1")
    assert wall < 5


def test_read_only_commands_create_no_store(tmp_path: Path) -> None:
    """generate, config show and data inspect in a new folder: nothing appears there (no .detoxflow/mlflow.db)."""
    proc, wall = detoxflow(["generate", "hello", "--model", "models:/nope@champion"], tmp_path, timeout=60)
    assert_one_line(proc, 2, "models:/nope@champion", "no tracking store")
    assert wall < 5
    assert list(tmp_path.iterdir()) == []
    proc, _ = detoxflow(["config", "show", "-c", str(DEFAULT)], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc, _ = detoxflow(["data", "inspect", "-c", str(DEFAULT), "--show", "0"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


def _runs(db: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "select r.name, r.status, t.value from runs r left join tags t "
            "on t.run_uuid = r.run_uuid and t.key = 'detoxflow.failure'"
        ).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fn", "says"),
    [("nan_scores", "returned toxicity = nan"), ("raises", "raised RuntimeError: reward service down")],
)
def test_reward_failure_is_one_line_exit_2_and_a_failed_run(tmp_path: Path, fn: str, says: str) -> None:
    (tmp_path / "badreward.py").write_text(
        "def nan_scores(texts):\n    return [float('nan')] * len(texts)\n\n"
        "def raises(texts):\n    raise RuntimeError('reward service down')\n"
    )
    proc, _ = detoxflow(["train", "-c", str(DEFAULT), *SMALL, "--set", "reward.kind=callable",
                         "--set", f"reward.callable=badreward:{fn}"], tmp_path, timeout=600, PYTHONPATH=str(tmp_path),
                        PREFECT_LOGGING_LEVEL="INFO", DETOXFLOW_HOME=str(tmp_path / ".detoxflow"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if says in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-3000:]
    runs = _runs(tmp_path / ".detoxflow" / "mlflow.db")
    failed = [r for r in runs if r[1] == "FAILED"]
    assert failed and all(r[2] and says in r[2] for r in failed), runs
    assert not any(r[1] == "RUNNING" for r in runs)
    with sqlite3.connect(tmp_path / ".detoxflow" / "mlflow.db") as con:
        assert con.execute("select count(*) from model_versions").fetchone()[0] == 0


# ------------------------------------------------------------------------------------------ long prompts (row 10)

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
WORDS = "the customer wants a refund because the order arrived late and broken "


def _tiny_policy(tiny_models: dict[str, Path], arch: str):
    import torch

    from detoxflow.config import LoraSection, ModelConfig
    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    return Policy.load(ModelConfig(name_or_path=str(tiny_models[arch])), LoraSection(r=4, alpha=8))


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_long_prompt_keeps_instruction_and_end(tiny_models: dict[str, Path], arch: str) -> None:
    from detoxflow.models.data import Record, build_prompt
    from detoxflow.models.prompts import template_tail

    policy = _tiny_policy(tiny_models, arch)
    tok = policy.tokenizer
    long = build_prompt(TEMPLATE, Record("r-long", WORDS * 2000, "s"))  # ~140k characters
    short = build_prompt(TEMPLATE, Record("r-short", "person one asks about friday", "s"))
    q, qm = policy.encode_queries([long, short], 64, template_tail(TEMPLATE))
    assert q.shape[1] == 64
    kept = q[0][qm[0].bool()].tolist()
    body = tok(long, add_special_tokens=False)["input_ids"]  # the whole prompt, uncut
    n_tail = len(tok("\n\nSummary:", add_special_tokens=False)["input_ids"])
    added = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}  # what the tokenizer adds around it
    kept_body = kept[:]
    while kept_body and kept_body[-1] in added:
        kept_body.pop()
    while kept_body and kept_body[0] in added:
        kept_body.pop(0)
    assert kept_body[:20] == body[:20]  # the instruction before the dialogue
    assert kept_body[-n_tail:] == body[-n_tail:]  # "Summary:" at the end
    # a prompt that fits is encoded exactly as the tokenizer alone encodes it
    alone = tok([short], return_token_type_ids=False)["input_ids"][0]
    assert q[1][qm[1].bool()].tolist() == alone


def test_long_prompts_are_counted_or_refused(tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from detoxflow.config import DataConfig
    from detoxflow.models.data import DataError, Record, build_prompt
    from detoxflow.models.prompts import check_lengths

    tok = _tiny_policy(tiny_models, "t5").tokenizer
    recs = [Record("a", "hello there", "s"), Record("b", WORDS * 50, "s"), Record("c", WORDS * 60, "s")]
    prompts = [build_prompt(TEMPLATE, r) for r in recs]
    with caplog.at_level(logging.WARNING):
        n = check_lengths(tok, prompts, [r.id for r in recs], DataConfig(max_query_tokens=64), "evaluation")
    assert n == 2
    assert "2 of 3 prompts are longer than data.max_query_tokens=64" in caplog.text
    with pytest.raises(DataError, match="record 'b'.*data.max_query_tokens=64"):
        check_lengths(tok, prompts, [r.id for r in recs], DataConfig(max_query_tokens=64, truncation="refuse"), "x")


@pytest.mark.slow
def test_generate_with_a_98k_character_prompt(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    policy = _tiny_policy(tiny_models, "t5")
    model_dir = policy.save_artifact(tmp_path / "model")
    prompt = "Summarize the following conversation.\n\n" + (WORDS * 1400)[:98_000] + "\n\nSummary:"
    proc, _ = detoxflow(["generate", "--model", str(model_dir), "--max-new-tokens", "4", prompt], tmp_path,
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 1 prompts are longer than data.max_query_tokens=512" in proc.stderr
    assert "data.truncation=keep_instruction" in proc.stderr
    proc, _ = detoxflow(["generate", "--model", str(model_dir), "--truncation", "refuse", prompt], tmp_path,
                        timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "record 'prompt 1'" in errors[0] and "over data.max_query_tokens=512" in errors[0]


def test_preflight_imports_nothing_heavy() -> None:
    """The checks run before torch, transformers, Prefect or MLflow are imported (that is why they take ~1 s)."""
    code = ("import sys, detoxflow.cli, detoxflow.preflight, detoxflow.errors; "
            "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_class_the_error_table_names_exists_and_checkpoint_faults_are_environment() -> None:
    import importlib

    from detoxflow.errors import EXIT_CODES, exit_code
    from detoxflow.models.checkpoint import DamagedCheckpointError, DiskFullError, TrainingError

    for name in EXIT_CODES:
        module, cls = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
    assert exit_code(TrainingError("nan")) == 2
    assert exit_code(DiskFullError("disk full at /w")) == 3
    assert exit_code(DamagedCheckpointError("/w/step-3/state.pt cannot be read")) == 3

"""State is found, not created where you stand: the home's resolution order, configs found from the project, a
missing store or model named with where it was looked for, `doctor`'s exit codes per mode, and a hub id that
cannot be reached failing in seconds with one line. Fast: no torch, Prefect or MLflow in these processes."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from detoxflow import paths, preflight
from detoxflow.config import Config
from detoxflow.doctor import run_doctor
from detoxflow.errors import InputError

PROJECT = Path(__file__).resolve().parent.parent


def cli(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DETOXFLOW_HOME", "DETOXFLOW_WORK_DIR", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "detoxflow.cli", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- resolution order


def test_home_order_env_then_nearest_marker_then_per_user(tmp_path: Path) -> None:
    project = tmp_path / "project"
    deep = project / "a" / "b"
    deep.mkdir(parents=True)
    xdg = {"XDG_DATA_HOME": str(tmp_path / "xdg")}

    # nothing above: the per-user location, created by nobody
    assert paths.find_home(deep, env=xdg).path == tmp_path / "xdg" / "detoxflow"
    assert "per-user" in paths.find_home(deep, env=xdg).origin
    assert not (tmp_path / "xdg").exists()

    # a .detoxflow/ two levels up is found from below it; a nearer one wins
    (project / ".detoxflow").mkdir()
    assert paths.find_home(deep, env=xdg).path == project / ".detoxflow"
    (project / "a" / ".detoxflow").mkdir()
    assert paths.find_home(deep, env=xdg).path == project / "a" / ".detoxflow"
    assert paths.find_home(project, env=xdg).path == project / ".detoxflow"

    # DETOXFLOW_HOME beats every folder
    env = {**xdg, "DETOXFLOW_HOME": str(tmp_path / "elsewhere")}
    assert paths.find_home(deep, env=env).path == tmp_path / "elsewhere"


def test_work_dir_and_store_follow_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETOXFLOW_WORK_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DETOXFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert paths.tracking_uri(Config(), create=False) == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert not (tmp_path / "home").exists() and not (tmp_path / ".detoxflow").exists()  # read, not created
    assert paths.work_dir(str(tmp_path / "mine"), create=False) == tmp_path / "mine"  # a config's work_dir wins
    monkeypatch.setenv("DETOXFLOW_WORK_DIR", str(tmp_path / "env"))
    assert paths.work_dir(str(tmp_path / "mine"), create=False) == tmp_path / "env"


def test_the_session_has_its_own_home() -> None:
    home = Path(os.environ["DETOXFLOW_HOME"])
    assert home.name.startswith("detoxflow-home-")
    assert paths.find_home().path == home.resolve()
    assert PROJECT not in home.parents and Path.home() / ".local" not in home.parents


# ------------------------------------------------------------------------------------------- through the CLI


def test_config_show_outside_the_project_finds_the_projects_configs(tmp_path: Path) -> None:
    proc, _ = cli(["config", "show"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "name: default"
    proc, _ = cli(["config", "show", "-c", "configs/causal.yaml"], tmp_path)
    assert proc.returncode == 0 and "name: causal" in proc.stdout, proc.stderr

    proc, _ = cli(["config", "show", "-c", "configs/nope.yaml"], tmp_path)
    assert proc.returncode == 2
    line = one_line(proc)
    assert str(tmp_path / "configs" / "nope.yaml") in line and str(PROJECT / "configs" / "nope.yaml") in line


def test_home_option_beats_the_environment_and_a_missing_store_says_where(tmp_path: Path) -> None:
    (tmp_path / "via-env").mkdir()
    args = ["generate", "--model", "models:/detoxflow-default@champion", "hello"]
    proc, wall = cli(["--home", str(tmp_path / "via-option"), *args], tmp_path, DETOXFLOW_HOME=str(tmp_path / "via-env"))
    assert proc.returncode == 2
    line = one_line(proc)
    assert f"no tracking store at {tmp_path / 'via-option' / 'mlflow.db'}" in line and "--home" in line
    assert wall < 15  # the same miss took 18 s through MLflow; most of this is the interpreter starting
    assert not (tmp_path / "via-option").exists()

    proc, _ = cli(args, tmp_path, XDG_DATA_HOME=str(tmp_path / "xdg"))  # no .detoxflow/ anywhere above tmp_path
    assert proc.returncode == 2
    assert "per-user default" in one_line(proc) and str(tmp_path / "xdg" / "detoxflow") in proc.stderr


def _registry(db: Path) -> None:
    """The three registry tables of an MLflow SQLite store, as MLflow names them, with one model."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE registered_models (name TEXT PRIMARY KEY)")
        conn.execute("CREATE TABLE registered_model_aliases (alias TEXT, version INTEGER, name TEXT)")
        conn.execute("CREATE TABLE model_versions (name TEXT, version INTEGER)")
        conn.execute("INSERT INTO registered_models VALUES ('detoxflow-default')")
        conn.execute("INSERT INTO model_versions VALUES ('detoxflow-default', 1)")
        conn.execute("INSERT INTO registered_model_aliases VALUES ('challenger', 1, 'detoxflow-default')")


def test_a_missing_model_alias_or_version_is_named_without_mlflow(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    _registry(db)
    preflight.check_registered("models:/detoxflow-default@challenger", db)
    preflight.check_registered("models:/detoxflow-default/1", db)
    with pytest.raises(InputError, match=r"no registered model 'other' .*registered: detoxflow-default"):
        preflight.check_registered("models:/other@champion", db)
    with pytest.raises(InputError, match=r"has no alias 'champion' .*aliases: challenger"):
        preflight.check_registered("models:/detoxflow-default@champion", db)
    with pytest.raises(InputError, match="has no version 7"):
        preflight.check_registered("models:/detoxflow-default/7", db)
    code = ("import sys; from pathlib import Path; from detoxflow import preflight\n"
            f"preflight.check_registered('models:/detoxflow-default/1', Path({str(db)!r}))\n"
            "print('mlflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ------------------------------------------------------------------------------------------- doctor


def doctor(env: dict[str, str], mode: str | None = None) -> tuple[int, str]:
    buf = io.StringIO()
    code = run_doctor(Console(file=buf, width=300, color_system=None), env=env, mode=mode)
    return code, buf.getvalue()


def test_doctor_local_mode_is_healthy_without_any_server(tmp_path: Path) -> None:
    code, out = doctor({"DETOXFLOW_HOME": str(tmp_path / "home")})
    assert code == 0, out
    assert "mode: local" in out and "nothing run yet" in out and "PREFECT_API_URL" not in out

    (tmp_path / "home").mkdir()
    _registry(tmp_path / "home" / "mlflow.db")
    code, out = doctor({"DETOXFLOW_HOME": str(tmp_path / "home")})
    assert code == 0 and "1 registered model(s)" in out, out

    (tmp_path / "home" / "mlflow.db").write_bytes(b"not a database" * 100)
    code, out = doctor({"DETOXFLOW_HOME": str(tmp_path / "home")})
    assert code == 1 and "✘ MLflow store" in out and "fix:" in out, out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_doctor_team_mode_when_a_server_is_configured(tmp_path: Path) -> None:
    env = {"DETOXFLOW_HOME": str(tmp_path), "PREFECT_API_URL": f"http://127.0.0.1:{_closed_port()}/api"}
    code, out = doctor(env)
    assert code == 1
    assert "mode: team" in out and "✘ Prefect API" in out and "✘ MLFLOW_TRACKING_URI is not set" in out
    code, out = doctor({"DETOXFLOW_HOME": str(tmp_path)}, mode="team")  # asked for: the team checks, failing
    assert code == 1 and "export PREFECT_API_URL=" in out


def test_doctor_command_exit_codes(tmp_path: Path) -> None:
    proc, _ = cli(["doctor"], tmp_path, DETOXFLOW_HOME=str(tmp_path / "h"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc, _ = cli(["doctor", "--mode", "team"], tmp_path, DETOXFLOW_HOME=str(tmp_path / "h"))
    assert proc.returncode == 1


# ------------------------------------------------------------------------------------------- the hub, offline


def test_hub_id_without_internet_fails_within_5_s_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a hub endpoint that refuses connections, and an empty cache: what a machine without internet sees
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(preflight, "_hub_probe", {})
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"model.name_or_path 'google/flan-t5-base' is a hub id, but the hub is not "
                                         r"reachable .*pass a local folder"):
        preflight.check_model_name("model.name_or_path", "google/flan-t5-base")
    assert time.monotonic() - t0 < 5
    # a cached snapshot loads without the hub
    (tmp_path / "hub" / "models--google--flan-t5-base" / "snapshots" / "abc").mkdir(parents=True)
    preflight.check_model_name("model.name_or_path", "google/flan-t5-base")


def test_lab_config_offline_is_one_line_in_seconds(tmp_path: Path) -> None:
    proc, wall = cli(["run", "-c", "configs/lab-flan-t5.yaml"], tmp_path, HF_HUB_OFFLINE="1",
                     HF_HUB_CACHE=str(tmp_path / "hub"), DETOXFLOW_HOME=str(tmp_path / "h"))
    assert proc.returncode == 2
    line = one_line(proc)
    assert "google/flan-t5-base" in line and "pass a local folder" in line
    assert wall < 15  # was 72 s and 168 lines; the check itself is bounded at preflight.HUB_TIMEOUT_S
    assert not (tmp_path / "h").exists()

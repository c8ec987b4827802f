"""The team path against real servers on 127.0.0.1: an MLflow server with proxied artifacts, PostgreSQL.

- a model logged and registered through the server is an MLflow pyfunc model: ``mlflow.pyfunc.load_model`` and
  ``mlflow models serve`` (REST ``/invocations``) predict with it, and after the artifact store moved, a fresh
  process that knows only the server URL (``detoxflow generate --model models:/NAME@champion``) prints the
  same greedy output;
- the gate lock is a PostgreSQL advisory lock when the backend is PostgreSQL, and it excludes a second holder,
  also when clients only know the server's http URL and ``$DETOXFLOW_LOCK_DB_URI``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from servers import (
    ManagedProcess,
    free_port,
    http_ok,
    migrated_sqlite_store,
    mlflow_server_env,
    postgres_available,
    start_mlflow_server,
    start_postgres,
)

from detoxflow.config import Config, GenerationConfig, LoraSection, ModelConfig, TrackingConfig
from detoxflow.locks import LOCK_DB_ENV, LockTimeout, gate_lock, lock_db_uri, lock_key

mlflow = pytest.importorskip("mlflow")
from detoxflow import tracking as T  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

needs_postgres = pytest.mark.skipif(not postgres_available(), reason="PostgreSQL binaries (initdb, pg_ctl) not installed")

PROMPT = "Summarize: person one asks for a refund because the order arrived late and broken."


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    if not postgres_available():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not installed")
    with start_postgres(tmp_path_factory.mktemp("pg")) as instance:
        yield instance


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", LOCK_DB_ENV, "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DETOXFLOW_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path: Path, uri: str, name: str = "srv") -> Config:
    return Config(name=name, work_dir=str(tmp_path / "work"), tracking=TrackingConfig(uri=uri))


def _serve(model_uri: str, tracking_url: str, log: Path) -> ManagedProcess:
    """``mlflow models serve -m MODEL_URI --env-manager local`` in this (the project's) environment."""
    port = free_port()
    env = {**mlflow_server_env(), "MLFLOW_TRACKING_URI": tracking_url,  # uvicorn from the project's environment
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    proc = ManagedProcess(cmd, log_path=log, health=lambda: http_ok(f"http://127.0.0.1:{port}/ping"), env=env,
                          ready_timeout=240, name="mlflow models serve")
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


def _invoke(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 (test-only, 127.0.0.1)
        return json.loads(resp.read())


def test_registered_champion_is_an_mlflow_model_that_loads_serves_and_moves(tiny_models, tmp_path):
    """The registered version is an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/…@champion")``
    predicts what the policy generates, ``mlflow models serve`` answers ``/invocations`` with it, and after the
    server's artifact store moved to another folder (the training machine's base, artifact folder and model
    cache gone) a fresh process's ``detoxflow generate`` and ``predict`` still agree, word for word."""
    import pandas as pd
    import torch

    from detoxflow.models.policy import Policy

    base = Path(shutil.copytree(tiny_models["t5"], tmp_path / "trainer-machine" / "base"))
    root_a = tmp_path / "store-a"
    store = migrated_sqlite_store(root_a / "mlflow.db")
    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(base), device="cpu"), LoraSection(r=4))
    art = policy.save_artifact(tmp_path / "trainer-machine" / "artifact", extra={"config": {"name": "srv"}})
    gen = GenerationConfig(max_new_tokens=48, min_new_tokens=0, do_sample=False)  # what `generate` uses
    expected = policy.generate_texts([PROMPT], gen)[0]
    short = policy.generate_texts([PROMPT], GenerationConfig(max_new_tokens=5, min_new_tokens=0, do_sample=False))[0]
    adapter_base = json.loads((art / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert adapter_base == "../base" and str(tmp_path) not in (art / "adapter" / "adapter_config.json").read_text()
    del policy

    with start_mlflow_server(root_a, backend_uri=f"sqlite:///{store}") as server:
        cfg = _cfg(tmp_path, server.url)
        with T.parent_run(cfg, "pipeline"):
            T.log_split(cfg.data.eval_split, "abcdabcdabcdabcd", "embedded", ["d1", "d2"], "evaluation")
            with T.child_run("train") as train_id:
                uri = T.log_model_dir(art)
                T.metric_logger(train_id)({"objective/kl": 0.1}, step=1)
            version = T.register_model(cfg, train_id, metrics={"eval/toxicity_mean": 0.02})
            T.set_champion(cfg.registered_model_name, version)
        champion_uri = f"models:/{cfg.registered_model_name}@champion"
        champion = T.get_alias(cfg.registered_model_name, T.CHAMPION)
        assert (champion.version, champion.run_id, champion.split_digest) == (version, train_id, "abcdabcdabcdabcd")
        assert uri == f"models:/{champion.model_id}"
        assert champion.metrics == {"eval/toxicity_mean": 0.02}
        # the files live in the server's artifact destination, not in any client folder
        assert list(server.artifacts_dir.rglob("adapter_model.safetensors"))
        assert not (tmp_path / "work" / "mlartifacts").exists()

        # MLflow's own loader, by registry alias: a prompt column in, a summary column out, params honoured
        model = mlflow.pyfunc.load_model(champion_uri)
        assert model.metadata.get_model_info().signature.params is not None
        out = model.predict(pd.DataFrame({"prompt": [PROMPT]}))
        assert list(out.columns) == ["summary"] and out["summary"].tolist() == [expected]
        assert model.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"max_new_tokens": 5})["summary"][0] == short

        # MLflow's own server, in the project's environment, over REST
        with _serve(champion_uri, server.url, tmp_path / "serve.log") as served:
            answer = _invoke(served.url, {"dataframe_records": [{"prompt": PROMPT}]})
            assert answer == {"predictions": [{"summary": expected}]}, served.log_tail()
            answer = _invoke(served.url, {"inputs": {"prompt": [PROMPT]}, "params": {"max_new_tokens": 5}})
            assert answer == {"predictions": [{"summary": short}]}, served.log_tail()

    # another machine: the artifact store moved, the trainer's base and artifact folder and every cache gone
    root_b = tmp_path / "store-b"
    root_b.mkdir()
    shutil.copyfile(store, root_b / "mlflow.db")
    shutil.move(str(root_a / "artifacts"), str(root_b / "artifacts"))
    shutil.rmtree(tmp_path / "trainer-machine")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    home = tmp_path / "home"
    home.mkdir()
    with start_mlflow_server(root_b, backend_uri=f"sqlite:///{root_b / 'mlflow.db'}") as moved:
        cli = Path(sys.executable).parent / "detoxflow"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "MLFLOW_TRACKING_URI": moved.url}
        res = subprocess.run([str(cli), "generate", "--model", champion_uri, PROMPT],
                             env=env, cwd=home, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        printed = res.stdout.rstrip("\n")
        assert printed.strip(), f"no text printed; stderr: {res.stderr[-2000:]}"
        # rich may wrap long lines, so compare words
        assert printed.split() == expected.split()
        cached = list((home / ".cache" / "detoxflow" / "models").rglob("MLmodel"))
        assert len(cached) == 1 and cached[0].parent.name == f"v{version}"
        assert json.loads((cached[0].parent / "artifacts" / "detoxflow.json").read_text())["config"]["name"] == "srv"
        mlflow.set_tracking_uri(moved.url)
        again = mlflow.pyfunc.load_model(champion_uri).predict(pd.DataFrame({"prompt": [PROMPT]}))["summary"][0]
        assert again.split() == printed.split()
        # an unknown alias fails with a message that names what exists and the fix
        with pytest.raises(T.TrackingError, match="Aliases present: challenger, champion"):
            T.fetch_model(f"models:/{cfg.registered_model_name}@production", tracking_uri=moved.url)


def _contend(cfg: Config, timeout: float) -> str:
    """Try the gate lock from another thread (another PostgreSQL session); report what happened."""
    out: list[str] = []

    def run() -> None:
        try:
            with gate_lock(cfg, timeout=timeout):
                out.append("acquired")
        except LockTimeout as e:
            out.append(f"timeout: {e}")

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def _advisory_locks(pg_uri: str) -> list[int]:
    import psycopg2

    conn = psycopg2.connect(pg_uri)
    try:
        with conn.cursor() as cur:
            # a bigint key is stored as (classid = high 32 bits, objid = low 32 bits)
            cur.execute("SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks WHERE locktype = 'advisory'")
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def _as_signed(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


@needs_postgres
def test_gate_lock_is_a_postgres_advisory_lock_that_excludes_a_second_holder(pg, tmp_path):
    cfg = _cfg(tmp_path, pg.uri(driver="psycopg2"))
    assert lock_db_uri(cfg) == pg.uri(driver="psycopg2")
    key = lock_key(f"detoxflow.gate:{cfg.registered_model_name}")
    with gate_lock(cfg):
        assert [_as_signed(k) for k in _advisory_locks(pg.uri())] == [key]
        assert _contend(cfg, timeout=0.5).startswith("timeout: gate lock 'detoxflow.gate:detoxflow-srv'")
        # another model's gate is not blocked
        assert _contend(_cfg(tmp_path, pg.uri(driver="psycopg2"), name="other"), timeout=0.5) == "acquired"
    assert _advisory_locks(pg.uri()) == []
    assert _contend(cfg, timeout=2) == "acquired"


@needs_postgres
def test_team_mode_server_on_postgres_with_lock_db_from_env(pg, tmp_path, monkeypatch):
    """Clients know the http URL; the lock uses the server's database named in $DETOXFLOW_LOCK_DB_URI."""
    pg.create_database("mlflow")
    db = pg.uri("mlflow", driver="psycopg2")
    with start_mlflow_server(tmp_path / "srv", backend_uri=db) as srv:
        cfg = _cfg(tmp_path, srv.url)
        assert lock_db_uri(cfg) is None  # without the env var only a local file lock is possible
        monkeypatch.setenv(LOCK_DB_ENV, db)
        assert lock_db_uri(cfg) == db

        model_dir = tmp_path / "model"
        model_dir.mkdir()
        (model_dir / "detoxflow.json").write_text("{}")
        with T.parent_run(cfg, "pipeline"):
            with T.child_run("train") as run_id:
                T.log_dir(model_dir, "model")  # a bare folder (the registry's legacy path): this test is about locks
            v1 = T.register_model(cfg, run_id)
            v2 = T.register_model(cfg, run_id)
        assert (v1, v2) == ("1", "2")
        assert T.get_alias(cfg.registered_model_name, T.CHALLENGER).version == "2"

        with gate_lock(cfg):
            T.set_champion(cfg.registered_model_name, v1)
            assert _contend(cfg, timeout=0.5).startswith("timeout:")
            assert len(_advisory_locks(pg.uri("mlflow"))) == 1
        assert T.get_alias(cfg.registered_model_name, T.CHAMPION).version == "1"
        assert _contend(cfg, timeout=2) == "acquired"
        # the runs and the registry live in PostgreSQL, not in a client-side file
        assert not (tmp_path / "work" / "mlflow.db").exists()

"""The team path against real servers on 127.0.0.1: an MLflow server with proxied artifacts, PostgreSQL.

- a model logged and registered through the server loads in a fresh process that knows only the server URL
  (``detoxflow generate --model models:/NAME@champion``), with identical greedy output;
- the gate lock is a PostgreSQL advisory lock when the backend is PostgreSQL, and it excludes a second holder,
  also when clients only know the server's http URL and ``$DETOXFLOW_LOCK_DB_URI``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from servers import migrated_sqlite_store, postgres_available, start_mlflow_server, start_postgres

from detoxflow.config import Config, GenerationConfig, LoraSection, ModelConfig, TrackingConfig
from detoxflow.locks import LOCK_DB_ENV, LockTimeout, gate_lock, lock_db_uri, lock_key

mlflow = pytest.importorskip("mlflow")
from detoxflow import tracking as T  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

needs_postgres = pytest.mark.skipif(not postgres_available(), reason="PostgreSQL binaries (initdb, pg_ctl) not installed")

PROMPT = "Summarize: person one asks for a refund because the order arrived late and broken."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    store = migrated_sqlite_store(root / "mlflow.db")  # migrate before start: the server is healthy sooner
    with start_mlflow_server(root, backend_uri=f"sqlite:///{store}") as srv:
        yield srv


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


def test_registered_champion_generates_in_a_fresh_process_via_the_server(server, tiny_models, tmp_path):
    import torch

    from detoxflow.models.policy import Policy

    cfg = _cfg(tmp_path, server.url)
    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models["t5"]), device="cpu"), LoraSection(r=4))
    art = policy.save_artifact(tmp_path / "artifact", extra={"config": cfg.model_dump(mode="json")})
    gen = GenerationConfig(max_new_tokens=48, min_new_tokens=0, do_sample=False)  # what `generate` uses
    expected = policy.generate_texts([PROMPT], gen)[0]

    with T.parent_run(cfg, "pipeline"):
        T.log_split(cfg.data.eval_split, "abcdabcdabcdabcd", "embedded", ["d1", "d2"], "evaluation")
        with T.child_run("train") as train_id:
            uri = T.log_model_dir(art)
            T.metric_logger(train_id)({"objective/kl": 0.1}, step=1)
        version = T.register_model(cfg, train_id, metrics={"eval/toxicity_mean": 0.02})
        T.set_champion(cfg.registered_model_name, version)
    assert uri.startswith("mlflow-artifacts:/"), "artifacts must be proxied by the server"
    champion = T.get_alias(cfg.registered_model_name, T.CHAMPION)
    assert (champion.version, champion.run_id, champion.split_digest) == (version, train_id, "abcdabcdabcdabcd")
    assert champion.metrics == {"eval/toxicity_mean": 0.02}
    # the files really live in the server's artifact destination, not in any client folder
    assert list(server.artifacts_dir.rglob("adapter_model.safetensors"))
    assert not (tmp_path / "work" / "mlartifacts").exists()

    # another machine: a fresh process, an empty home and working dir, only the server's URL
    home = tmp_path / "home"
    home.mkdir()
    cli = Path(sys.executable).parent / "detoxflow"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "MLFLOW_TRACKING_URI": server.url}
    res = subprocess.run(
        [str(cli), "generate", "--model", f"models:/{cfg.registered_model_name}@champion", PROMPT],
        env=env, cwd=home, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = res.stdout.rstrip("\n")
    assert printed.strip(), f"no text printed; stderr: {res.stderr[-2000:]}"
    # same weights, same greedy decoding: the same words (rich may wrap long lines, so compare words)
    assert printed.split() == expected.split()
    cached = list((home / ".cache" / "detoxflow" / "models").rglob("detoxflow.json"))
    assert len(cached) == 1 and cached[0].parent.name == f"v{version}"
    assert json.loads(cached[0].read_text())["config"]["name"] == "srv"

    # an unknown alias fails with a message that names what exists and the fix
    with pytest.raises(T.TrackingError, match="Aliases present: challenger, champion"):
        T.fetch_model(f"models:/{cfg.registered_model_name}@production", tracking_uri=server.url)


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
                T.log_model_dir(model_dir)
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

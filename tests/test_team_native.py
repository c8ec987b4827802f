"""Team mode for real, without Docker: the stack `detoxflow serve team` starts (PostgreSQL, MLflow server and
Prefect server on PostgreSQL, a worker per pool), checked the way a team uses it.

- `detoxflow doctor` names what is missing, and passes once deployments are registered;
- each pool's worker runs its deployment, with the stack's URLs in the flow run's environment;
- runs, registered versions, aliases, tags, artifacts and flow runs survive a restart of every process,
  PostgreSQL included;
- the compose entrypoint scripts (infra/) start the same servers natively;
- once flows/ and prefect.yaml exist: the pipeline deployment runs through the workers and registers a model.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers
from rich.console import Console

from detoxflow.doctor import run_doctor
from detoxflow.team import TeamError, TeamPorts, TeamStack, deploy_all, free_port, http_get, postgres_bin_dir
from detoxflow.team.auth import basic_auth

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _skip_reason() -> str | None:
    try:
        postgres_bin_dir()
    except TeamError as e:
        return str(e)
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user: initdb refuses root"
    return None


needs_postgres = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def doctor_output(env: dict[str, str], prefect_yaml: Path | None, mode: str | None = None) -> tuple[int, str]:
    buf = io.StringIO()
    code = run_doctor(Console(file=buf, width=200, color_system=None), env=env, prefect_yaml=prefect_yaml, mode=mode)
    return code, buf.getvalue()


# ---------------------------------------------------------------------------------------- without servers


def test_doctor_fails_with_a_fix_for_each_unreachable_service_and_hides_passwords() -> None:
    env = {
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "DETOXFLOW_LOCK_DB_URI": f"postgresql+psycopg2://detoxflow:s3cr3t-pw@127.0.0.1:{free_port()}/mlflow",
    }
    code, out = doctor_output(env, None)
    assert code == 1
    assert "✘ Prefect API" in out and "✘ MLflow tracking server" in out and "✘ PostgreSQL" in out
    assert out.count("fix:") >= 3
    assert "s3cr3t-pw" not in out


def test_doctor_says_how_to_set_missing_urls() -> None:
    code, out = doctor_output({}, None, mode="team")  # nothing configured is local mode: team checks on request
    assert code == 1
    assert "export PREFECT_API_URL=" in out and "export MLFLOW_TRACKING_URI=" in out


def test_stack_refuses_a_taken_port_and_names_it(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        stack = TeamStack(tmp_path, ports=TeamPorts(postgres=free_port(), mlflow=port, prefect=free_port()))
        with pytest.raises(TeamError, match=f"port {port}"):
            stack.start_mlflow()


# ---------------------------------------------------------------------------------------- the live stack


@pytest.fixture(scope="module")
def stack() -> Iterator[TeamStack]:
    with servers.team_stack("dfteam-") as st:
        yield st


@pytest.fixture(scope="module")
def hello_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal Prefect project: one flow deployed once per pool, writing what its worker gave it."""
    root = tmp_path_factory.mktemp("hello-project")
    (root / "hello.py").write_text(textwrap.dedent("""
        import json, os
        from prefect import flow

        @flow(name="hello")
        def hello(out: str) -> None:
            keys = ("DETOXFLOW_POOL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DETOXFLOW_LOCK_DB_URI")
            with open(out, "w") as f:
                json.dump({k: os.environ.get(k) for k in keys}, f)
    """))
    (root / "prefect.yaml").write_text(textwrap.dedent(f"""
        name: hello
        prefect-version: 3.9.1
        build: null
        push: null
        pull:
          - prefect.deployments.steps.set_working_directory:
              directory: {root}
        deployments:
          - name: hello-cpu
            entrypoint: hello.py:hello
            work_pool: {{name: cpu}}
          - name: hello-gpu
            entrypoint: hello.py:hello
            work_pool: {{name: gpu}}
    """))
    return root


def api(stack: TeamStack, method: str, path: str, body: dict | None = None) -> dict | list:
    return servers.prefect_api(stack.prefect_api_url, method, path, body)


def run_deployment(stack: TeamStack, name: str, parameters: dict, timeout: float = 240.0) -> dict:
    """Create a flow run of deployment 'flow/deployment' and wait for a final state (REST: no client settings)."""
    return servers.run_deployment(stack.prefect_api_url, name, parameters, timeout)


@pytest.fixture(scope="module")
def deployed(stack: TeamStack, hello_project: Path) -> Path:
    t0 = time.monotonic()
    names = deploy_all(project_root=hello_project, env=stack.env)
    assert names == ["hello/hello-cpu", "hello/hello-gpu"]
    print(f"\ndeploy_all in {time.monotonic() - t0:.1f} s")
    return hello_project


@needs_postgres
@pytest.mark.integration
def test_doctor_passes_on_services_and_names_missing_deployments(stack: TeamStack, hello_project: Path) -> None:
    code, out = doctor_output(stack.env, hello_project / "prefect.yaml")
    assert code == 1, out
    for ok in ("✔ Prefect API", "✔ work pool 'cpu': 1 worker(s) online", "✔ work pool 'gpu': 1 worker(s) online",
               "✔ MLflow tracking server", "✔ MLflow model registry", "✔ MLflow artifact proxy", "✔ PostgreSQL"):
        assert ok in out, out
    assert "✘ deployments missing: hello/hello-cpu, hello/hello-gpu" in out
    assert "detoxflow deploy" in out


@needs_postgres
@pytest.mark.integration
def test_deploy_then_doctor_passes_and_each_pool_runs_its_deployment(stack: TeamStack, deployed: Path,
                                                                      tmp_path: Path) -> None:
    code, out = doctor_output(stack.env, deployed / "prefect.yaml")
    assert code == 0, out
    assert "✔ deployments registered: hello/hello-cpu, hello/hello-gpu" in out

    # The real command, as a user types it, in the project folder.
    cli = subprocess.run([str(VENV_BIN / "detoxflow"), "doctor"], cwd=deployed, capture_output=True, text=True,
                         env={**os.environ, **stack.env}, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr

    for pool in ("cpu", "gpu"):
        marker = tmp_path / f"{pool}.json"
        run = run_deployment(stack, f"hello/hello-{pool}", {"out": str(marker)})
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["work_pool_name"] == pool
        seen = json.loads(marker.read_text())
        keys = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DETOXFLOW_LOCK_DB_URI")
        assert seen == {"DETOXFLOW_POOL": pool, **{k: stack.env[k] for k in keys}}, "the flow run must see the stack's URLs"


@needs_postgres
@pytest.mark.integration
@pytest.mark.slow
def test_nothing_is_lost_when_every_process_restarts(stack: TeamStack, deployed: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    for k, v in stack.env.items():  # the MLflow user's credentials too
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    exp = client.create_experiment(f"persist-{time.time_ns()}")
    run = client.create_run(exp, tags={"stage": "train"})
    run_id = run.info.run_id
    client.log_param(run_id, "ppo.kl.target", "6.0")
    client.log_metric(run_id, "objective/kl", 1.25, step=3)
    client.log_text(run_id, "adapter weights stand-in", "model/README.txt")
    client.set_terminated(run_id)
    name = f"detoxflow-persist-{time.time_ns()}"
    client.create_registered_model(name)
    v1 = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    v2 = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(name, "champion", v1.version)
    client.set_registered_model_alias(name, "challenger", v2.version)
    client.set_model_version_tag(name, v2.version, "gate.decision", "rejected: toxicity drop 0.05 < 0.2")
    flow_runs_before = {r["id"]: r["state_type"] for r in api(stack, "POST", "flow_runs/filter", {})}
    assert flow_runs_before, "the previous test's flow runs should be there"

    t0 = time.monotonic()
    stack.restart_all()  # workers, Prefect, MLflow, PostgreSQL down; then all up again on the same root
    print(f"\nrestart of every process in {time.monotonic() - t0:.1f} s: {stack.timings}")

    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    got = client.get_run(run_id)
    assert got.data.params["ppo.kl.target"] == "6.0"
    assert got.data.metrics["objective/kl"] == 1.25
    assert got.data.tags["stage"] == "train"
    local = client.download_artifacts(run_id, "model/README.txt", str(tmp_path))
    assert Path(local).read_text() == "adapter weights stand-in"
    assert client.get_model_version_by_alias(name, "champion").version == v1.version
    assert client.get_model_version_by_alias(name, "challenger").version == v2.version
    assert client.get_model_version(name, v2.version).tags["gate.decision"].startswith("rejected")
    assert {r["id"]: r["state_type"] for r in api(stack, "POST", "flow_runs/filter", {})} == flow_runs_before
    code, out = doctor_output(stack.env, deployed / "prefect.yaml")
    assert code == 0, out  # deployments, pools and workers are back as well


@needs_postgres
@pytest.mark.integration
@pytest.mark.slow
def test_compose_entrypoints_start_the_servers_natively(stack: TeamStack, tmp_path: Path) -> None:
    """infra/mlflow/entrypoint.sh and infra/prefect/worker-entrypoint.sh as the containers run them, here
    pointed at the native stack: a second MLflow server on the same database sees the same registry, and the
    worker creates its pool and answers its health check."""
    mlflow_port, health_port = free_port(), free_port()
    pool = f"entry-{time.time_ns()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    base["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    mlflow_env = {
        **base,
        "MLFLOW_BACKEND_STORE_URI": stack.role_url("detoxflow_mlflow", "mlflow"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        # the same user store as the stack's server, so the stack's users log in here too
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{stack.root / 'mlflow-auth.db'}",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_ARTIFACTS_DESTINATION": str(stack.artifacts),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(mlflow_port),
        "MLFLOW_ALLOWED_HOSTS": f"mlflow:{mlflow_port},127.0.0.1:{mlflow_port}",
    }
    worker_env = {**base, **stack.env, "DETOXFLOW_POOL": pool, "PREFECT_WORKER_WEBSERVER_PORT": str(health_port)}
    if os.geteuid() == 0:  # the entrypoint refuses root unless told this is a throwaway machine
        res = subprocess.run([str(ROOT / "infra/prefect/worker-entrypoint.sh")], env=worker_env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2 and "would run as root" in res.stderr, res.stdout + res.stderr
        worker_env["DETOXFLOW_ALLOW_ROOT_WORKER"] = "1"
    procs = []
    try:
        for script, env, log in (("infra/mlflow/entrypoint.sh", mlflow_env, "mlflow-entry.log"),
                                 ("infra/prefect/worker-entrypoint.sh", worker_env, "worker-entry.log")):
            with open(tmp_path / log, "wb") as out:
                procs.append(subprocess.Popen([str(ROOT / script)], env=env, cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{mlflow_port}"
        deadline = time.monotonic() + 180
        while http_get(f"{url}/health")[0] != 200 or http_get(f"http://127.0.0.1:{health_port}/health")[0] != 200:
            assert all(p.poll() is None for p in procs), (tmp_path / "mlflow-entry.log").read_text()[-3000:] + \
                (tmp_path / "worker-entry.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "entrypoints did not come up in 180 s"
            time.sleep(0.5)

        def search(host: str, creds: bool = True) -> int:
            worker = f"{stack.env['MLFLOW_TRACKING_USERNAME']}:{stack.env['MLFLOW_TRACKING_PASSWORD']}"
            req = urllib.request.Request(f"{url}/api/2.0/mlflow/registered-models/search?max_results=1",
                                         headers={"Host": host, **(basic_auth(worker) if creds else {})})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        assert search(f"mlflow:{mlflow_port}") == 200  # the compose service name is accepted
        assert search(f"mlflow:{mlflow_port}", creds=False) == 401  # the basic-auth app is on
        assert search("attacker.example") == 403  # DNS-rebinding protection stays on
        pools = api(stack, "POST", "work_pools/filter", {})
        assert pool in [p["name"] for p in pools], "the worker entrypoint creates its pool"
        assert stack.pool_has_online_worker(pool)
    finally:
        for p in procs:
            for sig in (15, 2, 9):
                if p.poll() is None:
                    os.killpg(p.pid, sig)
                    try:
                        p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        continue


@needs_postgres
@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_deployment_runs_through_the_workers_and_registers_the_model(stack: TeamStack, tiny_models,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The nightly deployment of the project's own prefect.yaml, with a tiny config as its parameters: the
    pipeline runs on the cpu worker, its training on the gpu worker, and the model lands in the team registry."""
    if not (ROOT / "prefect.yaml").is_file() or not (ROOT / "flows" / "pipeline.py").is_file():
        pytest.skip("prefect.yaml or flows/pipeline.py not in the project yet")
    if not (ROOT / "data" / "train.jsonl").is_file():
        pytest.skip("the shipped corpus data/*.jsonl is missing")
    from mlflow.tracking import MlflowClient

    from detoxflow.config import load_config

    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, stack.env[k])

    for split, n in (("train", 12), ("test", 4)):
        lines = (ROOT / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    name = f"team{time.time_ns()}"
    cfg = load_config(None, [
        f"name={name}", f"work_dir={tmp_path / 'work'}", f"data.source={tmp_path / 'data'}", "data.max_eval_samples=4",
        f"model.name_or_path={tiny_models['t5']}", "model.num_threads=1", "model.device=cpu", "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.steps=1", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
        "eval.k_samples=2", "eval.batch_size=8", "eval.bootstrap_samples=100", "eval.n_table_samples=3",
        # A random tiny model cannot detoxify; with no required drop the gate promotes, so both aliases move.
        "promotion.min_toxicity_drop=0.0",
        "orchestration.mode=team", "orchestration.poll_seconds=1", "orchestration.train_timeout_s=400",
    ])
    assert cfg.tracking.uri is None  # the workers' MLFLOW_TRACKING_URI, i.e. the stack's server, is used

    t0 = time.monotonic()
    deploy_all(project_root=ROOT, env=stack.env)
    print(f"\nproject deploy_all in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    run = run_deployment(stack, "pipeline/nightly", {"cfg": cfg.model_dump(mode="json")}, timeout=480)
    print(f"pipeline through the workers in {time.monotonic() - t0:.1f} s")
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["work_pool_name"] == "cpu"

    trains = [r for r in api(stack, "POST", "flow_runs/filter", {}) if r["parent_task_run_id"] and
              r["start_time"] and r["start_time"] >= run["start_time"]]
    train_dep = api(stack, "GET", "deployments/name/train/train-gpu")
    trains = [r for r in trains if r["deployment_id"] == train_dep["id"]]
    assert len(trains) == 1 and trains[0]["work_pool_name"] == "gpu" and trains[0]["state_type"] == "COMPLETED"

    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    registered = f"detoxflow-{name}"
    challenger = client.get_model_version_by_alias(registered, "challenger")
    champion = client.get_model_version_by_alias(registered, "champion")
    assert challenger.version == champion.version == "1"
    assert challenger.tags["decision"] == "promoted"
    logged = client.get_logged_model(challenger.source.removeprefix("models:/"))  # the run's pyfunc model
    assert logged.source_run_id == challenger.run_id
    assert logged.artifact_location.startswith("mlflow-artifacts:/")  # proxied: stored under the stack's artifacts
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id, "artifacts")}
    assert {"artifacts/adapter", "artifacts/detoxflow.json"} <= files


@pytest.mark.integration
def test_native_setup_postgres_script_creates_role_and_databases_idempotently(tmp_path: Path) -> None:
    """infra/native/setup-postgres.sh against a real PostgreSQL (the private test instance of tests/servers.py)."""
    from servers import postgres_available, start_postgres

    if not postgres_available():
        pytest.skip("PostgreSQL server binaries not available")
    import psycopg2

    with start_postgres(tmp_path) as pg:
        pw = {"DETOXFLOW_PG_MLFLOW_PASSWORD": "0123abcd" * 3, "DETOXFLOW_PG_PREFECT_PASSWORD": "4567ef01" * 3,
              "DETOXFLOW_PG_LOCK_PASSWORD": "89abcdef" * 3}
        env = {**os.environ, "PATH": f"{postgres_bin_dir()}{os.pathsep}{os.environ['PATH']}",
               "PGHOST": pg.host, "PGPORT": str(pg.port), "PGUSER": pg.user, **pw}
        res = subprocess.run([str(ROOT / "infra/native/setup-postgres.sh")], capture_output=True, text=True,
                             env={**env, "DETOXFLOW_PG_LOCK_PASSWORD": "change-me-lock-db-password"}, timeout=60)
        assert res.returncode == 2 and "DETOXFLOW_PG_LOCK_PASSWORD" in res.stderr
        for _ in range(2):  # the second run must succeed too
            res = subprocess.run([str(ROOT / "infra/native/setup-postgres.sh")], env=env, capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
            assert not any(p in res.stdout + res.stderr for p in pw.values())
        conn = psycopg2.connect(pg.uri())
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT d.datname, r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
                            "WHERE d.datname IN ('prefect', 'mlflow') ORDER BY 1")
                assert cur.fetchall() == [("mlflow", "detoxflow_mlflow"), ("prefect", "detoxflow_prefect")]
                cur.execute("SELECT rolname, rolcanlogin, rolsuper, rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid "
                            "WHERE rolname LIKE 'detoxflow%' ORDER BY 1")
                assert cur.fetchall() == [(r, True, False, True) for r in
                                          ("detoxflow_lock", "detoxflow_mlflow", "detoxflow_prefect")]
        finally:
            conn.close()

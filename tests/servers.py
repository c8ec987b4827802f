"""Real servers for integration tests, started as processes on 127.0.0.1.

Everything here is test infrastructure, reused by the MLflow, Prefect and PostgreSQL tests:

- :func:`free_port` and :func:`wait_until` (poll a health check with a deadline),
- :class:`ManagedProcess`: a context manager that starts a command in its own process group, writes its
  output to a log file, waits until a health check passes (or fails fast with the log's tail when the process
  dies), and tears the whole group down (SIGTERM, then SIGINT, then SIGKILL: a Prefect worker can ignore
  SIGTERM after running flows),
- :func:`start_mlflow_server` (SQLite or PostgreSQL backend, proxied artifacts) and :func:`start_postgres`
  (a private PostgreSQL instance with trust auth, owned by the ``postgres`` user when we run as root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """A test server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (test-only, 127.0.0.1)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    """Poll ``check`` until it returns True; raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def _tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no log>"


class ManagedProcess:
    """A long-running command with a health check, used as a context manager.

    ``with ManagedProcess(["prefect", "server", "start", ...], log_path=..., health=lambda: http_ok(url)) as p:``
    starts the command in a new session (its own process group, so children such as uvicorn workers die with
    it), waits until ``health()`` is True, and on exit stops the group. If the process exits before it is
    healthy, :class:`ServerError` carries the last lines of its log.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        log_path: Path,
        health: Callable[[], bool] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        name: str | None = None,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log_path)
        self.health = health
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.name = name or Path(self.cmd[0]).name
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._log = log
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, start_new_session=True,
        )
        deadline = t0 + self.ready_timeout
        while self.health is not None and not self.health():
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(
                    f"{self.name} exited with code {self.proc.returncode} before it was healthy. "
                    f"Command: {' '.join(self.cmd)}\n--- log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} not healthy after {self.ready_timeout:.0f} s. Command: {' '.join(self.cmd)}\n"
                    f"--- log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n_chars: int = 4000) -> str:
        return _tail(self.log_path, n_chars)

    def stop(self) -> None:
        """Stop the process group: SIGTERM, then SIGINT, then SIGKILL, each with a grace period."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, self.stop_timeout), (signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Children that outlived the leader (e.g. a uvicorn worker) still sit in the group.
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    url: str
    backend_uri: str
    artifacts_dir: Path
    process: ManagedProcess


def mlflow_server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for an MLflow server: job execution off (else ~2.2 GB of job workers), no telemetry."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
    )
    env.update(extra or {})
    return env


def migrated_sqlite_store(path: Path) -> Path:
    """Create an empty MLflow SQLite store at ``path`` (schema migrated) to copy into tests and servers."""
    code = "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
    # a subprocess, so that the test process's global MLflow state (tracking URI, engines) is untouched
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{path}"], env=mlflow_server_env(), check=True,
                   capture_output=True, timeout=300)
    return path


def store_work_dir(tmp_path: Path, monkeypatch, empty_store: Path) -> Path:
    """A work dir holding a fresh copy of ``empty_store`` (:func:`migrated_sqlite_store`) as its ``mlflow.db``, with
    the variables that would point a test elsewhere (tracking URI, work dir, lock database, active run) unset and
    the model cache under ``tmp_path``: a config with ``work_dir`` set to it tracks into its own store."""
    for var in ("MLFLOW_TRACKING_URI", "DETOXFLOW_WORK_DIR", "DETOXFLOW_LOCK_DB_URI", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DETOXFLOW_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(empty_store, work / "mlflow.db")  # each test gets a fresh store
    return work


@contextlib.contextmanager
def start_mlflow_server(
    tmpdir: Path, backend_uri: str | None = None, *, port: int | None = None, ready_timeout: float = 120.0
) -> Iterator[MlflowServer]:
    """An ``mlflow server`` on 127.0.0.1 with proxied artifacts (``--serve-artifacts``) under ``tmpdir``.

    backend_uri: None = SQLite in ``tmpdir/mlflow.db``; PostgreSQL needs ``postgresql+psycopg2://``.
    Clients need only the URL: artifacts go through the server (``mlflow-artifacts:/`` URIs)."""
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{tmpdir / 'mlflow.db'}"
    artifacts = tmpdir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    proc = ManagedProcess(
        cmd, log_path=tmpdir / "mlflow-server.log", health=lambda: http_ok(f"{url}/health"),
        env=mlflow_server_env(), cwd=tmpdir, ready_timeout=ready_timeout, name="mlflow server",
    )
    with proc:
        yield MlflowServer(url=url, backend_uri=backend_uri, artifacts_dir=artifacts, process=proc)


# ------------------------------------------------------------------------------------------ PostgreSQL


def postgres_bin_dir() -> Path | None:
    """The directory with initdb / pg_ctl (Debian keeps them out of PATH), or None if PostgreSQL is absent."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_available() -> bool:
    if postgres_bin_dir() is None:
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
    return True


@dataclass
class Postgres:
    host: str
    port: int
    data_dir: Path
    user: str = "postgres"

    def uri(self, dbname: str = "postgres", driver: str | None = None) -> str:
        """``postgresql://`` (libpq), or ``postgresql+psycopg2://`` / ``postgresql+asyncpg://`` with ``driver``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.uri())
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()


def _run_as_postgres(args: Sequence[str], log: Path) -> None:
    """Run a PostgreSQL tool, as the ``postgres`` user when we are root (initdb refuses to run as root)."""
    cmd = " ".join(_shell_quote(a) for a in args)
    full = ["su", "postgres", "-c", cmd] if os.geteuid() == 0 else ["sh", "-c", cmd]
    with open(log, "ab") as fh:
        res = subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, timeout=120, check=False)
    if res.returncode != 0:
        raise ServerError(f"{' '.join(args[:2])} failed with code {res.returncode}\n--- {log} ---\n{_tail(log)}")


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(str(s))


@contextlib.contextmanager
def start_postgres(tmpdir: Path | None = None, *, port: int | None = None) -> Iterator[Postgres]:
    """A private PostgreSQL instance on 127.0.0.1 with trust auth; stopped and removed on exit.

    The data directory lives in a fresh folder under /tmp (not ``tmpdir``: pytest's temp root is mode 0700 and
    the ``postgres`` user could not enter it; the socket path must also stay short). ``tmpdir`` receives the log.
    """
    bindir = postgres_bin_dir()
    if bindir is None:
        raise ServerError("PostgreSQL binaries not found (looked in /usr/lib/postgresql/*/bin and PATH)")
    root = Path(tempfile.mkdtemp(prefix="dfpg-"))
    log = Path(tmpdir or root) / "postgres.log"
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chmod(root, 0o755)
        for p in (root, data):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = port or free_port()
    _run_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                      "--auth-local=trust", "--auth-host=trust"], log)
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    _run_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(data / "server.log"),
                      "-w", "-t", "60", "start"], log)
    try:
        yield Postgres(host="127.0.0.1", port=port, data_dir=data)
    finally:
        with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
            _run_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], log)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------- Prefect REST

FINAL_FLOW_RUN_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


# api URL -> Prefect auth string of the stacks `team_stack` started (their API refuses anonymous calls)
PREFECT_AUTH: dict[str, str] = {}


def prefect_api(api_url: str, method: str, path: str, body: dict | None = None) -> dict | list:
    """One call of the Prefect server's REST API (no client settings involved: the test names the server).

    Sends the credentials and CSRF token of a stack started by :func:`team_stack`, if `api_url` is one's. A busy
    server's 429 / 502 / 503 is retried with backoff, as Prefect's own client does (on a loaded machine its
    SQLite answers 503 while another writer holds it)."""
    import json

    from detoxflow.team.auth import prefect_headers

    for attempt in range(6):
        req = urllib.request.Request(f"{api_url}/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers=prefect_headers(api_url, method, PREFECT_AUTH.get(api_url)))
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 (test-only, 127.0.0.1)
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503) or attempt == 5:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def create_deployment_run(api_url: str, name: str, parameters: dict) -> dict:
    """Create (schedule now) a flow run of deployment ``flow/deployment``; a worker of its pool picks it up."""
    dep = prefect_api(api_url, "GET", f"deployments/name/{name}")
    return prefect_api(api_url, "POST", f"deployments/{dep['id']}/create_flow_run", {"parameters": parameters})


def wait_flow_runs(api_url: str, run_ids: Sequence[str], timeout: float = 240.0, poll: float = 1.0) -> list[dict]:
    """Poll until every flow run is in a final state; returns them in the order of ``run_ids``."""
    deadline = time.monotonic() + timeout
    runs: dict[str, dict] = {}
    while True:
        for rid in run_ids:
            if rid not in runs or runs[rid]["state_type"] not in FINAL_FLOW_RUN_STATES:
                runs[rid] = prefect_api(api_url, "GET", f"flow_runs/{rid}")
        pending = [r for r in runs.values() if r["state_type"] not in FINAL_FLOW_RUN_STATES]
        if not pending:
            return [runs[rid] for rid in run_ids]
        if time.monotonic() > deadline:
            states = ", ".join(f"{r['name']}: {r['state_type']}" for r in pending)
            raise AssertionError(f"flow runs not final after {timeout:.0f} s: {states}")
        time.sleep(poll)


def run_deployment(api_url: str, name: str, parameters: dict, timeout: float = 240.0) -> dict:
    """Create a flow run of deployment ``flow/deployment`` and wait for a final state."""
    run = create_deployment_run(api_url, name, parameters)
    return wait_flow_runs(api_url, [run["id"]], timeout)[0]


@contextlib.contextmanager
def team_stack(prefix: str, env: Callable[[Path], dict[str, str]] = lambda root: {},
               **options: object) -> Iterator[object]:
    """A native TeamStack (detoxflow.team) on free ports in a fresh folder, started, then stopped and removed.

    ``env(root)`` gives extra environment for the stack's processes; ``options`` go to TeamStack."""
    from detoxflow.team import TeamPorts, TeamStack

    # Not pytest's tmp_path: its root is mode 0700, and as root PostgreSQL runs as the 'postgres' user.
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    options.setdefault("worker_user", None)  # workers as the test's user (root here); test_security checks another
    st = TeamStack(root, ports=TeamPorts.free(), ui=False, fsync=False, worker_query_seconds=1,
                   extra_env={"PREFECT_LOGGING_LEVEL": "INFO", **env(root)}, **options)
    t0 = time.monotonic()
    st.start()
    PREFECT_AUTH[st.prefect_api_url] = st.prefect_auth_string
    print(f"\nteam stack up in {time.monotonic() - t0:.1f} s: {st.timings}")
    try:
        yield st
    finally:
        PREFECT_AUTH.pop(st.prefect_api_url, None)
        st.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------- headless Chromium


class Browser:
    """One page of a headless Chromium, driven over the DevTools protocol (CDP) with `websockets`."""

    def __init__(self, ws: object) -> None:
        self.ws = ws
        self._id = 0

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        import json

        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str) -> object:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        return res.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        wait_until(lambda: self.eval("document.readyState") == "complete", timeout=60, what=f"{url} loaded")

    def text(self) -> str:
        return str(self.eval("document.body ? document.body.innerText : ''") or "")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@contextlib.contextmanager
def headless_chromium() -> Iterator[Browser]:
    """A fresh headless Chromium profile with one page; DevTools on a port Chromium picks (no port race)."""
    from websockets.sync.client import connect

    binary = chromium_binary()
    if binary is None:
        raise ServerError("chromium not installed (Debian: apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="dfchromium-"))
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), timeout=60, what="Chromium DevTools")
        port = int(port_file.read_text().split()[0])
        import json

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as r:  # noqa: S310
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            browser = Browser(ws)
            browser.send("Page.enable")
            browser.send("Network.enable")
            yield browser
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)

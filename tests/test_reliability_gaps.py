"""Reliability gaps of issue 17 (docs/reliability.md): the rank processes of `detoxflow train --num-processes 2`
die with the command (item 2); a tracking server that stops answering after the preflight is one line and exit 3
(items 5 and 6).

The processes a command started are found by a marker in their environment (inherited by every descendant), not
by name; the kill lands once both ranks have joined their process group (read from the ranks' log), not at a time.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
MARKER = "DETOXFLOW_TEST_MARKER"
TWO_RANKS = [
    "ppo.steps=50", "ppo.checkpoint_every=50", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1",
    "generation.max_new_tokens=8", "data.max_train_samples=16", "data.max_eval_samples=8", "model.num_threads=1",
    "model.device=cpu",
]


@pytest.fixture(scope="module")
def prefect_api(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def marked(value: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``MARKER=value``: the command and its descendants."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
    return sorted(found)


def left_after(value: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := marked(value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def start_two_rank_train(work: Path, api: str, marker: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DETOXFLOW_FAULT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env |= {"PREFECT_API_URL": api, MARKER: marker}
    work.mkdir(parents=True, exist_ok=True)
    sets = [a for s in (*TWO_RANKS, f"work_dir={work}") for a in ("--set", s)]
    cmd = [sys.executable, "-m", "detoxflow.cli", "train", "--num-processes", "2",
           "-c", str(PROJECT / "configs" / "default.yaml"), *sets]
    with (work / "command.log").open("wb") as fh:
        return subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)


def wait_for_ranks(proc: subprocess.Popen[bytes], work: Path) -> None:
    """Until both ranks have joined their process group (both rank processes exist and train)."""
    deadline = time.monotonic() + 600
    while True:
        logs = list(work.rglob("ranks.log"))
        text = logs[0].read_text(errors="replace") if logs else ""
        if all(f"rank {r} of 2 joined the process group" in text for r in (0, 1)):
            return
        assert proc.poll() is None, (work / "command.log").read_text(errors="replace")[-3000:] + text[-3000:]
        assert time.monotonic() < deadline, "the ranks did not start within 600 s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "term", "int"])
def test_rank_processes_die_with_the_command(tmp_path, prefect_api, sig):
    """Item 2: `detoxflow train --num-processes 2` killed (or sent SIGTERM / SIGINT) while its two ranks train:
    10 s later no process it started (launcher, ranks) is left."""
    marker = uuid.uuid4().hex
    work = tmp_path / "w"
    proc = start_two_rank_train(work, prefect_api, marker)
    try:
        wait_for_ranks(proc, work)
        assert len(marked(marker)) >= 4  # the command, the launcher and two ranks
        proc.send_signal(sig)
        proc.wait(timeout=60)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:300] for p in left_after(marker, 10)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in marked(marker):  # clean up after a failure: only the processes this test started
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert left == {}


# ----------------------------------------------------------------------- the tracking server stops answering


def test_tracking_server_lost_mid_run_is_one_environment_error(tmp_path, monkeypatch):
    """A run on an MLflow server that stops while the run logs: TrackingUnreachable (exit 3, one line naming the
    server), also when ending the run fails; another MlflowException (a run that does not exist) stays what it is."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from servers import start_mlflow_server

    from detoxflow import errors, tracking
    from detoxflow.config import load_config

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_mlflow_server(tmp_path / "srv") as srv:
        cfg = load_config(None, [f"tracking.uri={srv.url}", f"work_dir={tmp_path / 'w'}"])
        with pytest.raises(tracking.TrackingError) as missing:  # a real MLflow error: not the server's absence
            with tracking.parent_run(cfg, run_id="0" * 32):
                pass
        assert errors.exit_code(missing.value) == 2 and not isinstance(missing.value, tracking.TrackingUnreachable)
        assert tracking.backend.unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST")) is None

        with pytest.raises(Exception) as lost:
            with tracking.parent_run(cfg, "lost") as run_id:
                tracking.log_metrics({"x": 1.0}, step=1, run_id=run_id)
                srv.process.stop()
                tracking.log_metrics({"x": 2.0}, step=2, run_id=run_id)
    assert isinstance(lost.value, tracking.TrackingUnreachable), repr(lost.value)
    assert errors.exit_code(lost.value) == 3
    line = errors.one_line(lost.value)
    assert line.startswith(f"tracking server {srv.url} stopped answering") and "\n" not in line, line
    assert mlflow.active_run() is None


class _HealthOnce(http.server.BaseHTTPRequestHandler):
    """Answers one request (the preflight's ``GET /health``); then the server closes its socket: it died."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200 if self.path.startswith("/health") else 503)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


def test_tracking_server_that_dies_after_preflight_exits_3_with_one_line(tmp_path):
    """`detoxflow train` on a tracking server that answered the preflight's /health and then went away."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthOnce)
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def answer_once_then_die() -> None:
        server.handle_request()
        server.server_close()

    thread = threading.Thread(target=answer_once_then_die, daemon=True)
    thread.start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("DETOXFLOW_FAULT", "MLFLOW_TRACKING_URI")}
        cmd = [sys.executable, "-m", "detoxflow.cli", "train", "-c", str(PROJECT / "configs" / "default.yaml"),
               "--set", f"tracking.uri={url}", "--set", f"work_dir={tmp_path}"]
        started = time.monotonic()
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - started
        thread.join(timeout=10)
        assert not thread.is_alive()  # the preflight did reach it, and it went away
    finally:
        server.server_close()
    assert seconds < 60  # MLflow's retries are bounded
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    message = " ".join(res.stderr[res.stderr.rindex("error:"):].split())
    assert message.startswith(f"error: tracking server {url} stopped answering"), message

"""Screenshots of the real UIs for the docs, taken with headless Chromium and checked before they are kept.

    .venv/bin/python tools/screenshots.py                      # servers + the default pipeline + screenshots
    .venv/bin/python tools/screenshots.py --set ppo.steps=5     # the same with overrides of the config
    .venv/bin/python tools/screenshots.py --mlflow-url http://127.0.0.1:5000 \\
        --prefect-url http://127.0.0.1:4200 --no-run            # a running team stack, its latest pipeline run

Without URLs it starts an MLflow server and a Prefect server on free ports of 127.0.0.1 (stores in a temporary
folder), runs ``detoxflow run`` against them, and stops them at the end. It then captures five pages into
docs/img (``--out``): the pipeline's MLflow run, the registered model with its aliases, the version the gate
decided on (its decision and reasons), and the Prefect flow run and its summary artifact. Each page is loaded twice
by ``chromium --headless``: ``--dump-dom`` first, and the PNG is kept only if the rendered DOM holds the words
that page must show ("champion" and the gate's decision; the run's name and config): a login page, an error page or a page
the JS app has not rendered yet fails the script (exit 1) with the page named, and leaves no PNG behind.

Credentials for a stack with basic auth come from the variables the clients already use:
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow and PREFECT_API_AUTH_STRING ("user:password")
for Prefect. They reach Chromium in the page URL, which is on Chromium's command line while a page loads (other
users of the machine can read it there): use the stack's read-only user, `detoxflow-reader`, for MLflow.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("CHROMIUM", "chromium")
BUDGET_MS = 25_000  # virtual time the JS apps get to fetch and render before the DOM is read


class ShotError(RuntimeError):
    """A page that did not render what it must show, a server that did not start, a run that failed."""


# ------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (127.0.0.1)
                return
        except OSError:
            time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log and log.is_file() else ""
    raise ShotError(f"{what} did not answer at {url} within {seconds:.0f} s\n{tail}")


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` in its own process group, its output in ``log``; stopped (TERM, then KILL) on exit."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()


@contextlib.contextmanager
def local_servers(tmp: Path) -> Iterator[tuple[str, str]]:
    """An MLflow server and a Prefect server on 127.0.0.1, stores under ``tmp``; yields their base URLs."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    m_port, p_port = free_port(), free_port()
    (tmp / "artifacts").mkdir(parents=True, exist_ok=True)
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                  "--serve-artifacts", "--artifacts-destination", str(tmp / "artifacts"),
                  "--host", "127.0.0.1", "--port", str(m_port), "--workers", "1"]
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p_port)]
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{p_port}/api"  # the UI's own API calls (default port 4200)
    with process(mlflow_cmd, tmp / "mlflow.log", env, tmp), process(prefect_cmd, tmp / "prefect.log", env, tmp):
        mlflow_url, prefect_url = f"http://127.0.0.1:{m_port}", f"http://127.0.0.1:{p_port}"
        wait_http(f"{mlflow_url}/health", 180, "the MLflow server", tmp / "mlflow.log")
        wait_http(f"{prefect_url}/api/health", 180, "the Prefect server", tmp / "prefect.log")
        print(f"servers up: MLflow {mlflow_url}, Prefect {prefect_url}", flush=True)
        yield mlflow_url, prefect_url


# ------------------------------------------------------------------------------------------ REST look-ups


def credentials(kind: str) -> tuple[str, str] | None:
    """(user, password) for ``kind`` ('mlflow' or 'prefect') from the clients' own variables, or None."""
    if kind == "mlflow":
        user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        return (user, pw) if user and pw else None
    auth = os.environ.get("PREFECT_API_AUTH_STRING", "")
    return tuple(auth.split(":", 1)) if ":" in auth else None  # type: ignore[return-value]


def call(base: str, kind: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(base.rstrip("/") + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    if (cred := credentials(kind)) is not None:
        req.add_header("authorization", "Basic " + base64.b64encode(":".join(cred).encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (the stack the user named)
        return json.load(resp)


@dataclass(frozen=True)
class Outcome:
    """The pipeline run the screenshots show, as the two servers record it."""

    experiment_id: str
    run_id: str
    run_name: str
    model: str
    version: str
    decision: str
    flow_run_id: str
    artifact_id: str


def latest_outcome(mlflow_url: str, prefect_url: str, experiment: str) -> Outcome:
    """The newest finished pipeline run of ``experiment``, its registered version and its Prefect flow run."""
    exp = call(mlflow_url, "mlflow", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
    exp_id = exp["experiment"]["experiment_id"]
    runs = call(mlflow_url, "mlflow", "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp_id], "max_results": 50, "order_by": ["attributes.start_time DESC"],
        "filter": "attributes.status = 'FINISHED'"})
    for run in runs.get("runs", []):
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        if "mlflow.parentRunId" in tags or "detoxflow.stage" in tags or "detoxflow.prefect_flow_run_id" not in tags:
            continue  # stages, standalone flows and runs not made by a flow
        flow_run_id = tags["detoxflow.prefect_flow_run_id"]
        summary = call(mlflow_url, "mlflow", "/get-artifact?" + urllib.parse.urlencode(
            {"path": "summary.json", "run_uuid": run["info"]["run_id"]}))
        arts = call(prefect_url, "prefect", "/api/artifacts/filter", {
            "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["markdown"]}}})
        found = [a for a in arts if (a.get("key") or "").startswith("detoxflow-summary")]
        if not found:
            raise ShotError(f"flow run {flow_run_id} has no detoxflow-summary artifact in Prefect at {prefect_url}")
        return Outcome(exp_id, run["info"]["run_id"], run["info"]["run_name"], summary["registered_model"],
                       str(summary["version"]), str(summary["decision"]), flow_run_id, found[0]["id"])
    raise ShotError(f"no finished pipeline run in experiment '{experiment}' at {mlflow_url}")


# ------------------------------------------------------------------------------------------ chromium


def with_credentials(url: str, kind: str) -> str:
    cred = credentials(kind)
    if cred is None:
        return url
    parts = urllib.parse.urlsplit(url)
    user, pw = (urllib.parse.quote(c, safe="") for c in cred)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{pw}@{parts.netloc}"))


def chromium(*args: str, url: str, cwd: Path, height: int = 1000) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--window-size=1440,{height}", f"--virtual-time-budget={BUDGET_MS}", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise ShotError(f"chromium failed ({proc.returncode}) on {url.split('@')[-1]}: {proc.stderr[-1000:]}")
    return proc.stdout


def visible_text(dom: str) -> str:
    """The DOM's text without scripts, styles and tags, whitespace collapsed (what a reader can see)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def shoot(name: str, url: str, kind: str, must_show: list[str], out: Path, tmp: Path, height: int = 1000) -> Path:
    """Render ``url``; keep ``out/<name>.png`` (1440 x ``height`` pixels) only if the page's text holds every
    word of ``must_show`` (case-insensitive)."""
    full = with_credentials(url, kind)
    text = visible_text(chromium("--dump-dom", url=full, cwd=tmp))
    missing = [w for w in must_show if w.lower() not in text.lower()]
    if missing:
        raise ShotError(f"{name}: {url} does not show {missing} (a login page, an error or not rendered); "
                        f"it shows: {text[:300]!r}")
    shot = tmp / f"{name}.png"
    chromium(f"--screenshot={shot}", url=full, cwd=tmp, height=height)
    if not shot.is_file() or shot.stat().st_size < 10_000:
        raise ShotError(f"{name}: chromium wrote no screenshot of {url}")
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{name}.png"
    shutil.copyfile(shot, dest)
    print(f"{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}: {url}", flush=True)
    return dest


def capture(mlflow_url: str, prefect_url: str, o: Outcome, out: Path, tmp: Path) -> list[Path]:
    m, p = mlflow_url.rstrip("/"), prefect_url.rstrip("/")
    verdict = o.decision  # 'promoted' / 'rejected': the summary's word and the version's tag `decision`
    return [
        # the parent run holds the config and the stage timings; the decision lives on the version and the gate
        shoot("ui-mlflow-run", f"{m}/#/experiments/{o.experiment_id}/runs/{o.run_id}", "mlflow",
              [o.run_name, "ppo.kl.target", "time/total_s"], out, tmp),
        shoot("ui-mlflow-model", f"{m}/#/models/{o.model}", "mlflow", [o.model, "champion"], out, tmp),
        shoot("ui-mlflow-version", f"{m}/#/models/{o.model}/versions/{o.version}", "mlflow",
              ["champion", "decision", verdict, "promotion.reasons"], out, tmp, height=1600),
        shoot("ui-prefect-summary", f"{p}/artifacts/artifact/{o.artifact_id}", "prefect",
              [verdict, "toxicity", o.model], out, tmp, height=1400),
        shoot("ui-prefect-flow-run", f"{p}/runs/flow-run/{o.flow_run_id}", "prefect",
              ["pipeline", "Completed"], out, tmp),
    ]


# ------------------------------------------------------------------------------------------ main


def run_pipeline(mlflow_url: str, prefect_url: str, config: str, overrides: list[str], work: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": f"{prefect_url.rstrip('/')}/api"}
    sets = [a for o in [f"work_dir={work}", *overrides] for a in ("--set", o)]
    cmd = [str(BIN / "detoxflow"), "run", "--config", str(ROOT / config), *sets]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=work.parent, env=env, check=False)
    if proc.returncode != 0:
        raise ShotError(f"detoxflow run exited {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml", help="config of the pipeline run to show")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.field=value")
    ap.add_argument("--mlflow-url", help="a running MLflow server (default: start one)")
    ap.add_argument("--prefect-url", help="a running Prefect server, without /api (default: start one)")
    ap.add_argument("--no-run", action="store_true", help="show the latest pipeline run instead of running one")
    ap.add_argument("--experiment", default="detoxflow", help="MLflow experiment of the pipeline runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    ap.add_argument("--work-dir", type=Path, help="the run's work dir (kept; default: a temporary one)")
    args = ap.parse_args(argv)
    if shutil.which(CHROMIUM) is None:
        print(f"error: {CHROMIUM} not found; install Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    if bool(args.mlflow_url) != bool(args.prefect_url):
        print("error: pass both --mlflow-url and --prefect-url, or neither", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="detoxflow-shots-") as tmp_s:
        tmp = Path(tmp_s)
        work = args.work_dir or tmp / "work"
        try:
            with contextlib.ExitStack() as stack:
                urls = (args.mlflow_url, args.prefect_url) if args.mlflow_url else stack.enter_context(
                    local_servers(tmp / "servers"))
                if not args.no_run:
                    run_pipeline(*urls, args.config, args.overrides, work)
                outcome = latest_outcome(*urls, args.experiment)
                print(f"run {outcome.run_id}: {outcome.model} v{outcome.version} {outcome.decision}", flush=True)
                capture(*urls, outcome, args.out, tmp)
        except ShotError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

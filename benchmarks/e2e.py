"""End-to-end wall time of the README pipeline, split by stage, with a cold and then a warm cache.

``cold``: a fresh folder for everything the pipeline keeps between runs - the embedded-model cache
(``DETOXFLOW_CACHE``), the work dir with its MLflow store, checkpoints and cached stage results
(``DETOXFLOW_WORK_DIR``) and Prefect's home (``PREFECT_HOME``, its local database). ``warm``: the same command
again on the same folders, as a user's second ``detoxflow run`` would be.

Each mode runs two commands, as subprocesses, exactly as a user types them:

1. ``detoxflow bootstrap <arch>`` - the embedded model is built (cold, about a minute) or found (warm); timed
   here as the ``bootstrap`` stage (only for ``embedded:*`` models);
2. ``detoxflow run --config CONFIG`` - the pipeline; its summary (printed as JSON) carries the per-stage
   timings measured by the flow itself (prepare, baseline, train, evaluate, register, gate, total), and
   ``startup`` is what the process took beyond them (imports, Prefect's ephemeral API, MLflow setup).

Usage (from the project root, with the project venv active)::

    python benchmarks/e2e.py                                   # configs/default.yaml, cold then warm
    python benchmarks/e2e.py --config configs/causal.yaml --set ppo.steps=5
    python benchmarks/e2e.py --modes warm --root /tmp/e2e      # reuse a folder from an earlier run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILD_MARK = re.compile(r"bootstrap \w+: built in ")  # logged once per embedded-model build
STAGES = ("bootstrap", "prepare", "baseline", "train", "evaluate", "register", "gate", "startup", "wall")


class E2EError(RuntimeError):
    """A pipeline command failed; the message has its exit status and the tail of its output."""


def detoxflow_cmd() -> list[str]:
    """The CLI of the venv running this script (falls back to ``python -m detoxflow.cli``)."""
    exe = Path(sys.executable).with_name("detoxflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "detoxflow.cli"]


def env_for(root: Path, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DETOXFLOW_CACHE=str(root / "cache"),
        DETOXFLOW_WORK_DIR=str(root / "work"),
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
    )
    # the run's own SQLite store under the work dir, not a tracking server the caller's shell points at
    env.pop("MLFLOW_TRACKING_URI", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[float, str, str]:
    """Run ``cmd`` (output to ``log_path``); -> (wall seconds, stdout, stderr). Raises E2EError on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise E2EError(f"`{' '.join(cmd)}` exited {proc.returncode} (log: {log_path}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout, proc.stderr


def parse_summary(stdout: str) -> dict[str, Any]:
    """The JSON summary ``detoxflow run`` prints (the first top-level JSON object on its stdout)."""
    decoder = json.JSONDecoder()
    for i, line in enumerate(lines := stdout.splitlines()):
        if line.startswith("{"):
            obj, _ = decoder.raw_decode("\n".join(lines[i:]))
            if isinstance(obj, dict) and "timings" in obj:
                return obj
    raise E2EError("no JSON summary with 'timings' on the stdout of `detoxflow run`; did the CLI's output change?")


def model_arch(config: Path, overrides: list[str]) -> str | None:
    """'t5' / 'gpt2' when the config uses an embedded model (which ``detoxflow bootstrap`` builds), else None."""
    from detoxflow.config import load_config

    name = load_config(config, overrides).model.name_or_path
    return name.removeprefix("embedded:") if name.startswith("embedded:") else None


def run_mode(mode: str, root: Path, config: Path, overrides: list[str], threads: int | None) -> dict[str, Any]:
    env = env_for(root, threads)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"mode": mode, "load_before": round(os.getloadavg()[0], 2)}
    arch = model_arch(config, overrides)
    if arch is not None:
        row["bootstrap"], _, _ = timed([*detoxflow_cmd(), "bootstrap", arch], env, logs / f"{mode}-bootstrap.log")
    sets = [x for o in overrides for x in ("--set", o)]
    wall, stdout, stderr = timed([*detoxflow_cmd(), "run", "--config", str(config), *sets], env,
                                 logs / f"{mode}-run.log")
    # the embedded model's cache key covers bootstrap.py and the corpus: a build inside the pipeline means the
    # bootstrap above did not serve it (an edit in between), and its minutes land in a stage's figure
    row["builds_in_run"] = len(BUILD_MARK.findall(stderr))
    summary = parse_summary(stdout)
    timings: dict[str, float] = summary["timings"]
    row.update({k: v for k, v in timings.items() if k != "total"})
    row["pipeline_total"] = timings.get("total")
    row["startup"] = round(wall - float(timings.get("total", 0.0)), 2)
    row["wall"] = round(wall + float(row.get("bootstrap", 0.0)), 2)
    row["cached"] = summary.get("cached", {})
    row["headline"] = summary.get("headline")
    row["load_after"] = round(os.getloadavg()[0], 2)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Seconds per stage (and any stage the flow adds later), cache hits, embedded-model builds inside the run."""
    skip = {*STAGES, "pipeline_total", "builds_in_run", "load_before", "load_after"}
    extra = [k for r in rows for k in r if k not in skip and isinstance(r[k], float | int)]
    cols = [*STAGES[:-2], *dict.fromkeys(extra), "startup", "wall"]
    lines = ["| mode | " + " | ".join(f"{c} s" for c in cols) + " | cache hits | model builds in run | load (1 min) |",
             "|---|" + "---|" * (len(cols) + 3)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r.get(c), float | int) else "-" for c in cols]
        hits = ",".join(k for k, v in r.get("cached", {}).items() if v) or "none"
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + f" | {hits} | {r.get('builds_in_run', '-')} "
                     f"| {min(r['load_before'], r['load_after']):.1f}-{max(r['load_before'], r['load_after']):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--modes", default="cold,warm", help="comma list of cold,warm (warm alone reuses --root)")
    ap.add_argument("--root", type=Path, default=None, help="folder for cache/work/prefect (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the folder afterwards (always kept when --root is given)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the pipeline (default: unset)")
    ap.add_argument("--json", type=Path, default=None, help="results file (default .detoxflow/bench/e2e-<time>.json)")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in ("cold", "warm"):
            ap.error(f"--modes: unknown mode '{m}'; allowed: cold, warm")
    if not a.config.is_file():
        ap.error(f"--config {a.config}: no such file")
    root = a.root.resolve() if a.root else Path(tempfile.mkdtemp(prefix="detoxflow-e2e-"))
    if a.root:
        root.mkdir(parents=True, exist_ok=True)
    if "cold" in modes and a.root and any(root.iterdir()):
        ap.error(f"--root {root} is not empty: a cold run needs an empty folder (or leave --root out)")
    started = dt.datetime.now().astimezone()
    print(f"{started:%Y-%m-%d %H:%M}  load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus  root {root}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for mode in modes:
            row = run_mode(mode, root, a.config.resolve(), a.overrides, a.threads)
            rows.append(row)
            print(f"  {mode}: {row['wall']:.1f} s  ({row.get('headline')})", flush=True)
    except E2EError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if not (a.keep or a.root):
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(rows))
    out = a.json or PROJECT_ROOT / ".detoxflow" / "bench" / f"e2e-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": started.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
            "config": str(a.config), "overrides": a.overrides, "threads": a.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_at_end": list(os.getloadavg()),
            "command": " ".join(["e2e.py", *(argv if argv is not None else sys.argv[1:])])}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

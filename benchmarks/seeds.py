"""Detox across seeds: ``detoxflow run`` for each config x thread count x seed, one table per config.

Each run is the user's command with two overrides only (``seed`` and ``work_dir``); one work dir per config and
thread count, shared by its seeds, so the baseline is a cache hit after the first seed. ``OMP_NUM_THREADS`` sets
the thread count. Each finished run appends one JSON line to ``ROOT/rows.jsonl`` and is skipped when the script
runs again, so an interrupted measurement resumes where it stopped.

Per row: toxicity before -> after, the relative change with its 95% bootstrap CI, ROUGE-L before -> after and its
relative change, mean response length (tokens) before -> after, KL (``train/kl_mean``, what the gate reads), the
gate's decision, wall and CPU seconds of the whole run, the 1-minute load average at start and end. "bar": cut
>= 50%, ROUGE-L drop <= 10% relative, KL within the gate's bound (``promotion.max_kl``, else 2 x ``ppo.kl.target``).

Usage (from the project root, with the project venv active)::

    python benchmarks/seeds.py --configs configs/default.yaml configs/causal.yaml --seeds 0-7 --threads 2 1
    python benchmarks/seeds.py --root /tmp/seeds --jobs 2 --threads 1      # two 1-thread runs side by side
    python benchmarks/seeds.py --root /tmp/seeds --report                   # tables only, from rows.jsonl
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` or ``"0,3,5"`` -> a list of seeds."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def _last_json(stdout: str) -> dict[str, Any]:
    """The run's summary: the last top-level JSON object on stdout."""
    start = stdout.rfind("\n{")
    start = 0 if start < 0 and stdout.startswith("{") else start + 1
    return json.loads(stdout[start:])


def _newest(folder: Path, pattern: str) -> dict[str, Any]:
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else {}


def run_one(config: str, seed: int, threads: int, root: Path, bin_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One ``detoxflow run``; returns its row (raises with the run's last output lines when it fails)."""
    from detoxflow.config import load_config

    cfg = load_config(config)
    work = root / f"{Path(config).stem}-t{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    helptext = subprocess.run([str(bin_dir / "detoxflow"), "run", "--help"], capture_output=True, text=True,
                              env=env).stdout
    cmd = [str(bin_dir / "detoxflow"), "run", "--config", config, "--set", f"seed={seed}", "--set",
           f"work_dir={work}"]
    for item in extra:
        cmd += ["--set", item]
    if "--json" in helptext:
        cmd.append("--json")
    load0 = os.getloadavg()[0]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    s = _last_json(proc.stdout)
    base = _newest(work / "evals", "baseline-*.json").get("metrics", {})
    aligned = _newest(work / "evals", "aligned-*.json").get("metrics", {})
    ci = s.get("relative_change_ci") or [None, None]
    rouge0, rouge1 = s.get("rouge_l_before"), s.get("rouge_l_after")
    kl = s.get("kl")
    kl_bound = cfg.promotion.max_kl if cfg.promotion.max_kl is not None else 2.0 * cfg.ppo.kl.target
    row = {
        "config": Path(config).stem, "seed": seed, "threads": threads,
        "tox_before": s.get("toxicity_before"), "tox_after": s.get("toxicity_after"),
        "change": s.get("relative_change"), "ci_low": ci[0], "ci_high": ci[1],
        "rouge_before": rouge0, "rouge_after": rouge1,
        "rouge_change": (rouge1 - rouge0) / rouge0 if rouge0 and rouge1 is not None else None,
        "len_before": base.get("eval/length_mean"), "len_after": aligned.get("eval/length_mean"),
        "kl": kl, "kl_bound": kl_bound, "decision": s.get("decision"),
        "wall_s": round(wall, 1), "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": f"OMP_NUM_THREADS={threads} detoxflow " + " ".join(cmd[1:]),
    }
    row["bar"] = bool(row["change"] is not None and row["change"] <= -0.5 and row["rouge_change"] is not None
                      and row["rouge_change"] >= -0.10 and kl is not None and kl <= kl_bound)
    return row


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def report(rows: list[dict[str, Any]]) -> str:
    """One markdown table per config, then per (config, threads) the range and mean of the cut."""
    out: list[str] = []
    for config in sorted({r["config"] for r in rows}):
        sel = sorted((r for r in rows if r["config"] == config), key=lambda r: (-r["threads"], r["seed"]))
        out += [f"### {config}", "",
                "| seed | threads | toxicity before -> after | change (95% CI) | ROUGE-L | length (tokens) | KL (nats/seq) "
                "| bar | gate | wall s | CPU s | load | commit |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            out.append(
                f"| {r['seed']} | {r['threads']} | {r['tox_before']:.3f} -> {r['tox_after']:.3f} | "
                f"**{_pct(r['change'])}** ({_pct(r['ci_low'])} .. {_pct(r['ci_high'])}) | "
                f"{r['rouge_before']:.3f} -> {r['rouge_after']:.3f} ({_pct(r['rouge_change'])}) | "
                f"{r['len_before']:.1f} -> {r['len_after']:.1f} | {r['kl']:.2f} (<= {r['kl_bound']:g}) | "
                f"{'yes' if r['bar'] else '**no**'} | {r['decision']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                f"{r['load'][0]:.1f}-{r['load'][1]:.1f} | `{r['commit']}` |")
        out.append("")
        for threads in sorted({r["threads"] for r in sel}, reverse=True):
            cuts = [r["change"] for r in sel if r["threads"] == threads]
            ok = sum(r["bar"] for r in sel if r["threads"] == threads)
            out.append(f"{threads} thread(s): {len(cuts)} seeds, cut {_pct(max(cuts))} .. {_pct(min(cuts))}, "
                       f"mean {_pct(sum(cuts) / len(cuts))}; {ok} of {len(cuts)} meet the bar.")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["configs/default.yaml", "configs/causal.yaml"])
    ap.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3")
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (use with --threads 1)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/detoxflow-seeds"))
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (smoke tests: --set ppo.steps=2)")
    ap.add_argument("--report", action="store_true", help="print the tables from ROOT/rows.jsonl and exit")
    a = ap.parse_args(argv)
    a.root.mkdir(parents=True, exist_ok=True)
    rows_file = a.root / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    if not a.report:
        done = {(r["config"], r["seed"], r["threads"]) for r in rows}
        todo = [(c, s, t) for c in a.configs for t in a.threads for s in parse_seeds(a.seeds)
                if (Path(c).stem, s, t) not in done]
        bin_dir = Path(sys.executable).parent
        with cf.ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(run_one, c, s, t, a.root, bin_dir, a.extra): (c, s, t) for c, s, t in todo}
            for fut in cf.as_completed(futures):
                c, s, t = futures[fut]
                try:
                    row = fut.result()
                except RuntimeError as exc:
                    print(f"FAILED {c} seed {s} threads {t}: {exc}", file=sys.stderr, flush=True)
                    continue
                rows.append(row)
                with rows_file.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{row['config']} seed {s} threads {t}: {_pct(row['change'])} ROUGE-L "
                      f"{_pct(row['rouge_change'])} KL {row['kl']:.2f} bar {row['bar']} ({row['wall_s']:.0f} s)",
                      flush=True)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The KL sweep's pieces: settings (validated into configs), frontier rows, and the frontier report.

A *setting* is a label plus dotted overrides of the sweep's config, e.g.
``{"label": "no-kl", "ppo.kl.mode": "fixed", "ppo.kl.init_coef": 0.0}``. Settings may change only ``ppo.*``
and ``lora.*``: every setting is compared with the one baseline on the one held-out split, so anything that
changes the data, the base model, generation, scoring or evaluation would make the frontier compare apples
with pears (and would invalidate the shared cached baseline). The gate is the same for every setting too:
its KL bound is pinned to the sweep config's (``promotion.max_kl``, default 2 x ``ppo.kl.target``), not to
each adaptive setting's own target.

A sweep registers and gates its settings in a registered model of its own, ``<registered model>-sweep``
(:func:`sweep_model_name`, e.g. ``detoxflow-default-sweep``): an experiment, whatever its settings (no KL
included), never moves the ``champion`` or ``challenger`` alias of the model the pipeline promotes.

The pure functions (:func:`resolve_settings`, :func:`frontier_row`, :func:`frontier_markdown`) are tested
without Prefect or MLflow; :func:`publish_frontier` writes the plots, the table (markdown + JSON) and the
sample tables, logs them to the sweep's MLflow parent run and creates the Prefect artifacts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from detoxflow import tracking
from detoxflow.config import Config, ConfigError, config_from_dict, set_dotted
from detoxflow.models import plots
from detoxflow.models.evaluate import samples_table
from detoxflow.paths import work_dir
from detoxflow.tasks.evaluation import load_result
from detoxflow.tasks.reporting import artifact_key, toxicity_outcome

logger = logging.getLogger(__name__)

# What a setting may override: training only (see the module docstring).
ALLOWED_PREFIXES: tuple[str, ...] = ("ppo.", "lora.")
TAG_SWEEP = "detoxflow.sweep"  # on the parent run: "kl_sweep"
TAG_SETTING = "detoxflow.sweep_setting"  # on each setting's child run: its label
STAGE_PREFIX = "sweep:"  # a setting's child run is the stage "sweep:<label>"

# Frontier columns: (row key, header, format). The JSON table carries every row key; markdown these.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("label", "setting", "s"),
    ("kl", "KL (nats)", ".2f"),
    ("kl_coef_final", "final kl_coef", ".3g"),
    ("toxicity_after", "toxicity", ".4f"),
    ("toxicity_drop", "toxicity drop", "%"),
    ("rouge_l", "ROUGE-L", ".3f"),
    ("ref_perplexity", "ref ppl", ".3g"),
    ("distinct_2", "distinct-2", ".3f"),
    ("length_mean", "length (tokens)", ".1f"),
    ("top_token_share", "top-5 share", ".3f"),
    ("n_alarms", "alarms", "d"),
    ("decision", "gate", "s"),
)


@dataclass(frozen=True)
class SweepSetting:
    """One point of the sweep: ``label``, the ``overrides`` it was given and the validated ``cfg`` it trains."""

    label: str
    overrides: dict[str, Any]
    cfg: Config

    @property
    def slug(self) -> str:
        """The label as a folder name and Prefect artifact key part."""
        return artifact_key(self.label) or "setting"


def default_settings(cfg: Config) -> list[dict[str, Any]]:
    """The sweep's default points, scaled to ``cfg``'s own KL settings so that any config gets a sensible sweep.

    No penalty (the reward-hacking run), two fixed coefficients (a quarter of ``ppo.kl.init_coef`` and the
    coefficient itself) and the adaptive controller at half of ``ppo.kl.target`` and at the target (starting
    from ``init_coef``, moving with ``ppo.kl.horizon``). Training budget, learning rate and the controller's
    horizon come from ``cfg``: every setting trains the same way except for its KL."""
    coef, target = cfg.ppo.kl.init_coef, cfg.ppo.kl.target
    low = round(coef / 4, 4)
    return [
        {"label": "no KL", "ppo.kl.mode": "fixed", "ppo.kl.init_coef": 0.0},
        {"label": f"fixed {low:g}", "ppo.kl.mode": "fixed", "ppo.kl.init_coef": low},
        {"label": f"fixed {coef:g}", "ppo.kl.mode": "fixed", "ppo.kl.init_coef": coef},
        {"label": f"adaptive target {target / 2:g}", "ppo.kl.mode": "adaptive", "ppo.kl.target": target / 2},
        {"label": f"adaptive target {target:g}", "ppo.kl.mode": "adaptive", "ppo.kl.target": target},
    ]


def effective_max_kl(cfg: Config) -> float:
    """The gate's KL bound for ``cfg``: ``promotion.max_kl``, else 2 x ``ppo.kl.target`` (as the gate reads it)."""
    return cfg.promotion.max_kl if cfg.promotion.max_kl is not None else 2.0 * cfg.ppo.kl.target


SWEEP_MODEL_SUFFIX = "-sweep"


def sweep_model_name(cfg: Config) -> str:
    """The registered model a sweep of ``cfg`` registers into: the pipeline's name plus ``-sweep``."""
    name = cfg.registered_model_name
    return name if name.endswith(SWEEP_MODEL_SUFFIX) else name + SWEEP_MODEL_SUFFIX


def resolve_settings(cfg: Config, settings: Sequence[Mapping[str, Any]] | None = None) -> list[SweepSetting]:
    """Validate ``settings`` (default :func:`default_settings`) into one config per setting, each registering
    into :func:`sweep_model_name`.

    Raises :class:`ConfigError` naming the setting and the key: a setting that is not a mapping, an empty or
    duplicated label, a key outside ``ppo.*`` / ``lora.*``, or a value the config schema rejects."""
    raw = list(default_settings(cfg) if settings is None else settings)
    if not raw:
        raise ConfigError("kl_sweep: settings is empty; pass at least one, e.g. [{'label': 'no-kl', 'ppo.kl.init_coef': 0}]")
    base = cfg.model_dump(mode="json")
    max_kl = effective_max_kl(cfg)
    out: list[SweepSetting] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"kl_sweep setting #{i}: expected a mapping like {{'label': ..., 'ppo.kl.init_coef': 0.1}}, got {item!r}")
        overrides = {str(k): v for k, v in item.items() if k != "label"}
        label = str(item.get("label") or ", ".join(f"{k}={v}" for k, v in overrides.items()) or "").strip()
        if not label:
            raise ConfigError(f"kl_sweep setting #{i}: no label and no overrides; give it a 'label' and the ppo.* keys it changes")
        slug = artifact_key(label)
        if slug in seen:
            raise ConfigError(
                f"kl_sweep setting #{i} '{label}': its label collides with setting #{seen[slug]} (labels must differ in "
                "letters or digits; they name the child runs, folders and artifacts)"
            )
        seen[slug] = i
        bad = [k for k in overrides if not k.startswith(ALLOWED_PREFIXES)]
        if bad:
            raise ConfigError(
                f"kl_sweep setting '{label}': cannot override {', '.join(bad)}. Settings may change only "
                f"{' and '.join(p + '*' for p in ALLOWED_PREFIXES)}: every setting shares the baseline and the held-out "
                "evaluation. Change the others in the sweep's config (--config / --set) instead"
            )
        data = json.loads(json.dumps(base))
        for key, value in overrides.items():
            set_dotted(data, key, value, where=f"kl_sweep setting '{label}': '{key}'")
        # one gate for all settings: an adaptive setting with a low target must not get a stricter KL bound
        data["promotion"]["max_kl"] = max_kl
        data["tracking"]["registered_model"] = sweep_model_name(cfg)  # never the pipeline's model
        out.append(SweepSetting(label, overrides, config_from_dict(data, origin=f"kl_sweep setting '{label}'")))
    return out


def seed_setting(cfg: Config) -> None:
    """Seed the global torch RNG before a setting trains in this process.

    The policy draws its LoRA ``A`` matrices and its value head from the global RNG when it is built, so
    without this every setting would start from a different adapter (each earlier ``Policy.load`` in the
    sweep's process consumed random numbers) and the frontier would mix the KL's effect with the init's."""
    import torch

    torch.manual_seed(cfg.seed)


# ------------------------------------------------------------------------------------------ frontier rows


def _blocked_rules(reasons: Sequence[str]) -> list[str]:
    """Rule names of the BLOCK lines of a gate decision ('BLOCK ROUGE-L: ...' -> 'ROUGE-L')."""
    return [r[len("BLOCK "):].split(":", 1)[0] for r in reasons if r.startswith("BLOCK ")]


def frontier_row(
    setting: SweepSetting,
    train: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    gate: Mapping[str, Any],
    registered: Mapping[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """One row of the frontier: the setting, what it bought (toxicity drop), what it cost (KL, quality,
    monitors), and the gate's verdict. ``status`` is 'promoted', 'alarmed' (rejected with alarms) or 'rejected'."""
    m = evaluation["metrics"]
    tox = toxicity_outcome(evaluation)
    summary = train.get("summary") or {}
    kl_cfg = setting.cfg.ppo.kl
    alarms = tox["alarms"]
    status = "promoted" if gate["promote"] else ("alarmed" if alarms else "rejected")

    def finite(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None

    def num(d: Mapping[str, Any], key: str) -> float | None:
        return finite(d.get(key))

    rel = finite(tox["relative_change"])
    ci_low, ci_high = (finite(x) for x in tox["relative_change_ci"])
    return {
        "label": setting.label,
        "overrides": dict(setting.overrides),
        "backend": setting.cfg.ppo.backend,
        "kl_mode": kl_cfg.mode,
        "kl_coef_init": kl_cfg.init_coef,
        "kl_target": kl_cfg.target if kl_cfg.mode == "adaptive" else None,
        "kl_coef_final": num(summary, "train/kl_coef"),
        "kl": num(summary, "train/kl_mean"),
        "steps": train.get("steps"),
        "toxicity_before": finite(tox["toxicity_before"]),
        "toxicity_after": finite(tox["toxicity_after"]),
        "toxicity_drop": None if rel is None else -rel,
        "toxicity_drop_ci": [None if ci_high is None else -ci_high, None if ci_low is None else -ci_low],
        "expected_max_toxicity": num(m, "eval/expected_max_toxicity"),
        "rouge_l": num(m, "eval/rouge_l"),
        "ref_perplexity": num(m, "eval/ref_perplexity"),
        "distinct_2": num(m, "eval/distinct_2"),
        "length_mean": num(m, "eval/length_mean"),
        "top_token_share": num(m, "eval/top_token_share"),
        "exaggeration_share": num(m, "eval/exaggeration_share"),
        "repetition": num(m, "eval/repetition"),
        "alarms": alarms,
        "n_alarms": len(alarms),
        "decision": gate["decision"],
        "status": status,
        "blocked_by": _blocked_rules(gate.get("reasons") or []),
        "reasons": list(gate.get("reasons") or []),
        "version": str(registered["version"]),
        "model_uri": registered["uri"],
        "run_id": run_id,
    }


BASELINE_KEYS = {
    "toxicity_after": "eval/toxicity_mean",
    "expected_max_toxicity": "eval/expected_max_toxicity",
    "rouge_l": "eval/rouge_l",
    "ref_perplexity": "eval/ref_perplexity",
    "distinct_2": "eval/distinct_2",
    "length_mean": "eval/length_mean",
    "top_token_share": "eval/top_token_share",
    "exaggeration_share": "eval/exaggeration_share",
    "repetition": "eval/repetition",
}


def baseline_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The policy before training in frontier-row keys (KL 0, toxicity drop 0)."""
    row: dict[str, Any] = {"label": "baseline (before training)", "kl": 0.0, "toxicity_drop": 0.0, "n_alarms": 0,
                           "decision": "–", "kl_coef_final": None}
    row.update({k: float(metrics[v]) for k, v in BASELINE_KEYS.items() if v in metrics})
    return row


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if fmt == "%":
        return f"{100 * float(value):+.1f}%"
    if fmt == "s":
        return str(value)
    if fmt == "d":
        return str(int(value))
    return format(float(value), fmt)


def frontier_markdown(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any], title: str) -> str:
    """The frontier as markdown: one table (baseline first), then each setting's alarms and blocking rules."""
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    for row in (baseline_row(baseline), *rows):
        lines.append("| " + " | ".join(_cell(row.get(k), f) for k, _, f in TABLE_COLUMNS) + " |")
    lines += ["", "Toxicity drop is relative to the baseline on the same held-out prompts (positive = less toxic); KL is "
              "the mean over the last fifth of the training steps.", ""]
    for row in rows:
        verdict = f"**{row['decision']}** (version {row.get('version', '–')})"
        lines.append(f"## {row['label']}: {verdict}")
        lines.append("")
        if row.get("blocked_by"):
            lines.append("Blocked by: " + ", ".join(row["blocked_by"]))
            lines.append("")
        for alarm in row.get("alarms") or []:
            lines.append(f"- alarm: {alarm}")
        for reason in row.get("reasons") or []:
            if reason.startswith("BLOCK") and not reason.startswith("BLOCK monitors"):
                lines.append(f"- {reason}")
        lines.append("")
    return "\n".join(lines)


def setting_samples(baseline: Mapping[str, Any], evaluation: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """Before/after rows for a setting: the ``n`` prompts whose baseline response was most toxic (where
    detoxification shows) from the full result files both evaluations wrote."""
    return samples_table(load_result(baseline["result_path"]), load_result(evaluation["result_path"]), n,
                         order="most_toxic")


# ------------------------------------------------------------------------------------------ MLflow + Prefect


def log_setting(setting: SweepSetting, run_id: str) -> None:
    """On the setting's child run: its label (tag), its overrides (``sweep.*`` params) and its whole flattened
    config (params, so MLflow's run comparison lines the settings up by ``ppo.kl.*``) plus ``sweep/config.yaml``."""
    tracking.set_tags({TAG_SETTING: setting.label}, run_id=run_id)
    params = {f"sweep.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in setting.overrides.items()}
    params["sweep.label"] = setting.label
    params.update(tracking.config_params(setting.cfg))
    tracking.log_params(params, run_id, strict=False)  # a resumed child run has them already
    tracking.log_config(setting.cfg, "sweep/config.yaml", run_id=run_id)


def load_history(run_id: str) -> list[dict[str, float]]:
    """The trainer's per-step history that ``train_ppo`` logged to run ``run_id`` (``train/history.json``)."""
    return list(tracking.load_json(run_id, "train/history.json"))


@task(name="publish_samples_table", cache_policy=NO_CACHE, persist_result=False)
def publish_setting_samples(
    cfg: Config, setting_label: str, baseline: dict[str, Any], evaluation: dict[str, Any], run_id: str
) -> list[dict[str, Any]]:
    """The before/after sample table of one setting: logged to its child run and as a Prefect table artifact
    keyed by the setting (the pipeline's own sample artifact has one key per config and would be overwritten)."""
    rows = setting_samples(baseline, evaluation, cfg.eval.n_table_samples)
    tracking.log_table(rows, "sweep/samples.json", run_id=run_id)
    if rows:
        create_table_artifact(
            table=rows,
            key=artifact_key("kl-sweep-samples", cfg.name, setting_label),
            description=f"KL sweep, setting '{setting_label}': the same held-out prompts before and after training "
            "(most toxic baseline responses first)",
        )
    return rows


@task(name="publish_frontier", cache_policy=NO_CACHE, persist_result=False)
def publish_frontier(
    cfg: Config,
    rows: list[dict[str, Any]],
    baseline: dict[str, Any],
    parent_run_id: str,
    histories: dict[str, list[dict[str, float]]],
    samples: dict[str, list[dict[str, Any]]],
) -> dict[str, str]:
    """Plots, table and samples of the whole sweep: files under ``<work_dir>/sweeps/<parent run>/``, artifacts
    of the MLflow parent run (``plots/``, ``sweep/``) and Prefect artifacts (table, markdown report, images).

    Returns ``{name: local path}`` of what it wrote."""
    log = get_run_logger()
    out = work_dir(cfg.work_dir) / "sweeps" / parent_run_id
    out.mkdir(parents=True, exist_ok=True)
    base_metrics = baseline["metrics"]
    points = [
        {"label": r["label"], "kl": r["kl"], "toxicity_drop": r["toxicity_drop"], "rouge_l": r["rouge_l"],
         "status": r["status"], **{k: r[k] for k, _, _ in plots.SWEEP_PANELS if r.get(k) is not None}}
        for r in rows if r.get("kl") is not None and r.get("toxicity_drop") is not None and r.get("rouge_l") is not None
    ]
    mon = cfg.monitors
    thresholds = {"ref_perplexity": mon.max_ref_ppl_ratio, "distinct_2": mon.max_distinct2_drop,
                  "length_mean": mon.max_length_change, "top_token_share": mon.max_top_token_share}
    base_points = {k.removeprefix("eval/"): float(v) for k, v in base_metrics.items()}
    files: dict[str, Path] = {}
    if points:
        files["kl_frontier"] = plots.kl_frontier(points, out / "kl_frontier.png")
        files["sweep_panels"] = plots.sweep_panels(points, base_points, out / "sweep_panels.png", thresholds)
    if any(histories.values()):
        files["sweep_curves"] = plots.sweep_curves(histories, out / "sweep_curves.png")
    title = f"KL sweep of `{cfg.name}`"
    md = frontier_markdown(rows, base_metrics, title)
    table = {"config_name": cfg.name, "parent_run_id": parent_run_id, "baseline": baseline_row(base_metrics),
             "settings": rows, "samples": samples}
    files["frontier_md"] = out / "frontier.md"
    files["frontier_md"].write_text(md, encoding="utf-8")
    files["frontier_json"] = out / "frontier.json"
    files["frontier_json"].write_text(json.dumps(table, indent=1, default=str), encoding="utf-8")

    for path in files.values():
        tracking.log_file(path, "plots" if path.suffix == ".png" else "sweep", run_id=parent_run_id)
    key = artifact_key("kl-sweep", cfg.name)
    table_rows = [{h: _cell(r.get(k), f) for k, h, f in TABLE_COLUMNS} for r in (baseline_row(base_metrics), *rows)]
    create_table_artifact(table=table_rows, key=key, description="KL sweep frontier: toxicity drop vs KL vs quality, "
                          "alarms and the gate's decision per setting")
    create_markdown_artifact(markdown=md, key=f"{key}-report", description="KL sweep frontier with alarms and reasons")
    for name, path in files.items():
        if path.suffix == ".png":
            create_image_artifact(image_url=tracking.artifact_url(parent_run_id, f"plots/{path.name}"),
                                  key=artifact_key(key, name), description=f"KL sweep: {name.replace('_', ' ')}")
    log.info("KL sweep frontier written to %s and logged to MLflow run %s", out, parent_run_id)
    return {name: str(path) for name, path in files.items()}


def sweep_headline(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per setting: label, KL, toxicity change vs the baseline (negative = less toxic, as in the run's
    headline), ROUGE-L, alarms, decision."""
    def one(r: Mapping[str, Any]) -> str:
        drop = r.get("toxicity_drop")
        change = None if drop is None else -float(drop)
        return (f"{r['label']}: KL {_cell(r.get('kl'), '.2f')}, toxicity {_cell(change, '%')}, "
                f"ROUGE-L {_cell(r.get('rouge_l'), '.3f')}, {r.get('n_alarms', 0)} alarm(s), {r['decision']}")
    return "; ".join(one(r) for r in rows)


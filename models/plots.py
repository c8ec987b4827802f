"""PNG plots for the run report: toxicity before/after, training curves, the KL-sweep frontier.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so plotting is safe in
worker threads and never needs a display. Every function writes one PNG (creating parent folders) and returns
its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# Candidate keys for each curve, first present wins: the trainer's names (docs/architecture.md) first.
SCORE_KEYS = ("objective/scores", "objective/rlhf_reward")
KL_KEYS = ("objective/kl", "objective/kl_k3")
KL_COEF_KEY = "objective/kl_coef"
LENGTH_KEYS = ("env/response_length", "env/length_mean")
TOXICITY_KEY = "objective/toxicity"


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def toxicity_histogram(
    before: Sequence[float],
    after: Sequence[float],
    path: str | Path,
    threshold: float = 0.5,
    labels: tuple[str, str] = ("baseline", "aligned"),
    title: str | None = None,
) -> Path:
    """Overlaid histograms of per-response toxicity before and after training, with the means and the
    toxic threshold marked. Toxicity is in [0, 1]; both histograms share the same 20 bins."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.size == 0 or a.size == 0:
        raise ValueError(f"toxicity_histogram: need values on both sides (before {b.size}, after {a.size})")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    for values, label, color in ((b, labels[0], "tab:red"), (a, labels[1], "tab:blue")):
        ax.hist(values, bins=bins, alpha=0.5, color=color, label=f"{label} (n={values.size}, mean {values.mean():.4f})")
        ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1.5)
    ax.axvline(threshold, color="black", linestyle=":", linewidth=1, label=f"toxic threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("toxicity P(toxic)")
    ax.set_ylabel("responses")
    ax.set_title(title or "Toxicity of held-out responses before and after PPO")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _series(history: Sequence[Mapping[str, float]], keys: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(key, steps, values) of the first key present in the history; steps from 'step' or 1-based order."""
    for key in keys:
        rows = [(h.get("step", i + 1), h[key]) for i, h in enumerate(history) if key in h and h[key] is not None]
        rows = [(s, v) for s, v in rows if math.isfinite(float(v))]
        if rows:
            steps, values = zip(*rows)
            return key, np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    return None


def _missing(ax, keys: Sequence[str]) -> None:
    ax.text(0.5, 0.5, "not logged: " + ", ".join(keys), ha="center", va="center", transform=ax.transAxes, fontsize=9)


def training_curves(history: Sequence[Mapping[str, float]], path: str | Path, kl_target: float | None = None) -> Path:
    """Three panels over PPO steps: reward (score, RLHF reward, toxicity), KL with the KL coefficient on a second
    axis (and the adaptive target), and response length. ``history`` is the trainer's list of metric dicts."""
    if not history:
        raise ValueError("training_curves: the history is empty; train at least one step")
    fig = Figure(figsize=(13, 3.8))
    ax_r, ax_kl, ax_len = fig.subplots(1, 3)

    drawn = False
    for key in (*SCORE_KEYS, TOXICITY_KEY):
        if (s := _series(history, [key])) is not None:
            ax_r.plot(s[1], s[2], marker=".", label=key.split("/")[-1])
            drawn = True
    if drawn:
        ax_r.legend(fontsize=8)
    else:
        _missing(ax_r, SCORE_KEYS)
    ax_r.set_title("reward")
    ax_r.set_xlabel("step")

    if (s := _series(history, KL_KEYS)) is not None:
        ax_kl.plot(s[1], s[2], marker=".", color="tab:purple", label=f"KL ({s[0].split('/')[-1]}, nats/seq)")
        if kl_target is not None:
            ax_kl.axhline(kl_target, color="tab:purple", linestyle=":", label=f"target {kl_target:g}")
        ax_kl.set_ylabel("KL (nats per sequence)")
        lines, labels = ax_kl.get_legend_handles_labels()
        if (c := _series(history, [KL_COEF_KEY])) is not None:
            ax_coef = ax_kl.twinx()
            ax_coef.plot(c[1], c[2], color="tab:orange", linestyle="--", label="kl_coef")
            ax_coef.set_ylabel("kl_coef")
            more_lines, more_labels = ax_coef.get_legend_handles_labels()
            lines, labels = lines + more_lines, labels + more_labels
        ax_kl.legend(lines, labels, fontsize=8)
    else:
        _missing(ax_kl, KL_KEYS)
    ax_kl.set_title("KL to the reference")
    ax_kl.set_xlabel("step")

    if (s := _series(history, LENGTH_KEYS)) is not None:
        ax_len.plot(s[1], s[2], marker=".", color="tab:green")
        ax_len.set_ylabel("tokens")
    else:
        _missing(ax_len, LENGTH_KEYS)
    ax_len.set_title("response length")
    ax_len.set_xlabel("step")
    fig.tight_layout()
    return _save(fig, path)


def kl_frontier(points: Sequence[Mapping[str, float | str]], path: str | Path) -> Path:
    """The KL-sweep frontier: toxicity drop (%) against KL, coloured by ROUGE-L, one labelled point per run.

    Each point needs ``kl`` (nats), ``toxicity_drop`` (relative, 0.39 = 39% less toxic) and ``rouge_l``; an
    optional ``label`` (e.g. "target 3") is written next to it.
    """
    if not points:
        raise ValueError("kl_frontier: no points; the sweep produced no finished runs")
    for i, p in enumerate(points):
        missing = [k for k in ("kl", "toxicity_drop", "rouge_l") if k not in p]
        if missing:
            raise ValueError(f"kl_frontier: point #{i} ({p.get('label', '?')}) lacks {', '.join(missing)}")
    kl = np.asarray([float(p["kl"]) for p in points])
    drop = np.asarray([100.0 * float(p["toxicity_drop"]) for p in points])
    rouge = np.asarray([float(p["rouge_l"]) for p in points])
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    sc = ax.scatter(kl, drop, c=rouge, cmap="viridis", s=80, edgecolors="black")
    order = np.argsort(kl)
    ax.plot(kl[order], drop[order], color="grey", linewidth=0.8, zorder=0)
    for x, y, p in zip(kl, drop, points):
        if "label" in p:
            ax.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    fig.colorbar(sc, ax=ax, label="ROUGE-L")
    ax.set_xlabel("KL to the reference (nats per sequence)")
    ax.set_ylabel("toxicity drop vs baseline (%)")
    ax.set_title("KL sweep: toxicity drop vs KL vs quality")
    return _save(fig, path)


# Panels of :func:`sweep_panels`: (point key, y label, monitor threshold kind). Threshold kinds: "ratio" (alarm
# above baseline x factor), "drop" (alarm below baseline x (1 - factor)), "band" (alarm outside baseline
# x (1 ± factor)), "abs" (alarm above the value), None (no alarm on this metric).
SWEEP_PANELS: tuple[tuple[str, str, str | None], ...] = (
    ("toxicity_drop", "toxicity drop vs baseline (%)", None),
    ("rouge_l", "ROUGE-L", None),
    ("ref_perplexity", "reference perplexity", "ratio"),
    ("distinct_2", "distinct-2", "drop"),
    ("length_mean", "response length (tokens)", "band"),
    ("top_token_share", "top-5 word share", "abs"),
)
DECISION_COLORS = {"promoted": "tab:green", "alarmed": "tab:red", "rejected": "tab:grey"}


def _threshold_lines(kind: str | None, base: float | None, factor: float | None) -> list[float]:
    if kind is None or factor is None:
        return []
    if kind == "abs":
        return [factor]
    if base is None or not math.isfinite(base):
        return []
    return {"ratio": [base * factor], "drop": [base * (1 - factor)], "band": [base * (1 - factor), base * (1 + factor)]}[kind]


def sweep_panels(
    points: Sequence[Mapping[str, float | str]],
    baseline: Mapping[str, float],
    path: str | Path,
    thresholds: Mapping[str, float] | None = None,
) -> Path:
    """The KL sweep, one panel per metric against KL (symlog x: an unpenalised run's KL can be 100x the others).

    ``points``: one per setting with ``kl`` and the keys of :data:`SWEEP_PANELS` (a missing key leaves a gap),
    ``label`` and ``status`` ('promoted', 'alarmed' or 'rejected', which colours the marker). ``baseline``: the
    same keys for the policy before training (drawn as a dashed line; ``toxicity_drop`` is 0 there).
    ``thresholds``: the alarm settings ``ref_perplexity`` (ratio), ``distinct_2`` (relative drop),
    ``length_mean`` (relative change), ``top_token_share`` (absolute), drawn as red dotted lines.
    """
    if not points:
        raise ValueError("sweep_panels: no points; the sweep produced no finished runs")
    for i, p in enumerate(points):
        if "kl" not in p:
            raise ValueError(f"sweep_panels: point #{i} ({p.get('label', '?')}) lacks kl")
    thresholds = thresholds or {}
    fig = Figure(figsize=(13, 7))
    axes = fig.subplots(2, 3).ravel()
    kl = np.asarray([float(p["kl"]) for p in points])
    for ax, (key, ylabel, kind) in zip(axes, SWEEP_PANELS):
        scale = 100.0 if key == "toxicity_drop" else 1.0
        for x, p in zip(kl, points):
            if key not in p or not math.isfinite(float(p[key])):
                continue
            y = scale * float(p[key])
            ax.scatter([x], [y], s=70, edgecolors="black", color=DECISION_COLORS.get(str(p.get("status")), "tab:blue"))
            ax.annotate(str(p.get("label", "")), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        base = 0.0 if key == "toxicity_drop" else baseline.get(key)
        if base is not None and math.isfinite(float(base)):
            ax.axhline(scale * float(base), color="black", linestyle="--", linewidth=1, label="baseline")
        for i, y in enumerate(_threshold_lines(kind, None if base is None else float(base), thresholds.get(key))):
            ax.axhline(y, color="tab:red", linestyle=":", linewidth=1.2, label="alarm threshold" if i == 0 else None)
        if key == "ref_perplexity":
            ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL to the reference (nats per sequence)")
        ax.set_ylabel(ylabel)
        ax.margins(x=0.2, y=0.15)
        ax.legend(fontsize=7, loc="best")
    handles = [
        Line2D([], [], marker="o", linestyle="", markerfacecolor=c, markeredgecolor="black", label=s)
        for s, c in DECISION_COLORS.items()
    ]
    fig.suptitle("KL sweep: what each KL setting bought (toxicity) and cost (quality, monitors)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, title="gate decision", title_fontsize=9,
               bbox_to_anchor=(0.5, -0.02))
    return _save(fig, path)


def sweep_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Training curves of every sweep setting on shared axes: score, KL (symlog) and response length per step.

    ``histories``: setting label -> the trainer's history (one metric dict per step)."""
    if not histories or not any(histories.values()):
        raise ValueError("sweep_curves: no training histories")
    fig = Figure(figsize=(13, 3.8))
    panels = fig.subplots(1, 3)
    specs = ((SCORE_KEYS, "reward score"), (KL_KEYS, "KL (nats per sequence)"), (LENGTH_KEYS, "response length (tokens)"))
    for ax, (keys, title) in zip(panels, specs):
        for label, history in histories.items():
            if (s := _series(history, keys)) is not None:
                ax.plot(s[1], s[2], marker=".", markersize=3, linewidth=1, label=label)
        if keys is KL_KEYS:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(title)
        ax.set_xlabel("step")
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)

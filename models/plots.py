"""PNG plots for the run report: toxicity before/after, training curves, the KL-sweep frontier.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so plotting is safe in
worker threads and never needs a display. Every public plot function writes one PNG (creating parent folders)
and returns its path; the ``*_figure`` functions build the same figure without saving it.

Read at a glance: ticks are plain decimals (:func:`plain_ticks`: no offsets, no ``x10^n``), point labels are
placed where they overlap no other label or marker (:func:`place_labels`), legends sit outside the axes, and
the KL frontier joins the settings that are best so far in order of KL (:func:`frontier_indices`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation, Text
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    NullFormatter,
    ScalarFormatter,
    SymmetricalLogLocator,
)
from matplotlib.transforms import Bbox

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


def decimal(value: float, _pos: int | None = None) -> str:
    """A tick value as a plain decimal, at most 4 significant digits: 0.379402 -> '0.3794', 20.0 -> '20'."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    return np.format_float_positional(value, precision=4, unique=True, fractional=False, trim="-")


def plain_ticks(ax: Axes) -> None:
    """Plain decimal tick labels on both axes of ``ax``, whatever the scale: linear axes get a formatter with
    neither offset nor scientific notation; log and symlog axes get major ticks at 1, 2, 5 x 10^k written as
    decimals (2, 5, 10, 20) and unlabelled minor ticks. Call it after the scales are set."""
    for axis in (ax.xaxis, ax.yaxis):
        scale = axis.get_scale()
        if scale == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        elif scale == "symlog":
            tr = axis.get_transform()
            axis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=tr.linthresh, subs=(1.0, 2.0, 5.0)))
        else:
            fmt = ScalarFormatter(useOffset=False)
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)
            continue
        axis.set_major_formatter(FuncFormatter(decimal))
        axis.set_minor_formatter(NullFormatter())


def _legend_below(ax: Axes, handles: Sequence[object] | None = None, labels: Sequence[str] | None = None,
                  fontsize: float = 8) -> None:
    """The axes' legend under its x label, outside the plotting area (never on the data)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=min(len(handles), 2), frameon=False)


# Where a point's label may go, tried in order: (dx, dy) offset in points, horizontal and vertical alignment.
LABEL_SLOTS: tuple[tuple[float, float, str, str], ...] = (
    (6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"), (-6, -4, "right", "top"),
    (0, 8, "center", "bottom"), (0, -8, "center", "top"),
    (6, 16, "left", "bottom"), (6, -16, "left", "top"), (-6, 16, "right", "bottom"), (-6, -16, "right", "top"),
    (0, 22, "center", "bottom"), (0, -22, "center", "top"),
)
MARKER_PT = 5.0  # half the side of the box a marker keeps free of labels, in points


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _text_box(ann: Annotation, renderer: object) -> Bbox:
    """The annotation's text in pixels, without its leader line (positions updated as a draw would)."""
    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def place_labels(ax: Axes, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: float = 8) -> list[Annotation]:
    """Label each point (data coordinates) in the first of :data:`LABEL_SLOTS` where the text overlaps no
    label placed before, no marker and stays inside the axes; where none is free, the slot with the least
    overlap. A label placed away from its point gets a leader line. Call it after the axes' limits are final (it measures the text on the figure's canvas)."""
    fig = ax.figure
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    r = MARKER_PT * fig.dpi / 72.0
    taken = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    placed: list[Annotation] = []
    for x, y, text in zip(xs, ys, labels):
        best: tuple[float, Annotation] | None = None
        for dx, dy, ha, va in LABEL_SLOTS:
            far = abs(dy) > 8  # a label away from its point gets a thin leader line to it
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                              fontsize=fontsize,
                              arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6} if far else None)
            box = _text_box(ann, renderer)
            outside = box.width * box.height - _overlap(box, frame)
            cost = outside + sum(_overlap(box, t) for t in taken)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[1])
        taken.append(_text_box(best[1], renderer))
    return placed


def frontier_indices(kl: Sequence[float], drop: Sequence[float]) -> list[int]:
    """The settings on the KL frontier, in order of KL: each cuts toxicity more than every setting with a
    smaller KL (ties in KL: the larger drop). ``kl``, ``drop``: one value per setting."""
    order = sorted(range(len(kl)), key=lambda i: (float(kl[i]), -float(drop[i])))
    best = -math.inf
    out: list[int] = []
    for i in order:
        if float(drop[i]) > best:
            out.append(i)
            best = float(drop[i])
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
    plain_ticks(ax)
    _legend_below(ax)
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
    return _save(training_curves_figure(history, kl_target), path)


def training_curves_figure(history: Sequence[Mapping[str, float]], kl_target: float | None = None) -> Figure:
    """The figure of :func:`training_curves`; each panel's legend sits under it."""
    if not history:
        raise ValueError("training_curves: the history is empty; train at least one step")
    fig = Figure(figsize=(13, 4.4))
    ax_r, ax_kl, ax_len = fig.subplots(1, 3)

    drawn = False
    for key in (*SCORE_KEYS, TOXICITY_KEY):
        if (s := _series(history, [key])) is not None:
            ax_r.plot(s[1], s[2], marker=".", label=key.split("/")[-1])
            drawn = True
    if not drawn:
        _missing(ax_r, SCORE_KEYS)
    ax_r.set_title("reward")
    ax_r.set_xlabel("step")
    plain_ticks(ax_r)
    _legend_below(ax_r)

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
            plain_ticks(ax_coef)
            more_lines, more_labels = ax_coef.get_legend_handles_labels()
            lines, labels = lines + more_lines, labels + more_labels
        _legend_below(ax_kl, lines, labels)
    else:
        _missing(ax_kl, KL_KEYS)
    ax_kl.set_title("KL to the reference")
    ax_kl.set_xlabel("step")
    plain_ticks(ax_kl)

    if (s := _series(history, LENGTH_KEYS)) is not None:
        ax_len.plot(s[1], s[2], marker=".", color="tab:green")
        ax_len.set_ylabel("tokens")
    else:
        _missing(ax_len, LENGTH_KEYS)
    ax_len.set_title("response length")
    ax_len.set_xlabel("step")
    plain_ticks(ax_len)
    fig.tight_layout()
    return fig


def kl_frontier(points: Sequence[Mapping[str, float | str]], path: str | Path) -> Path:
    """The KL-sweep frontier: toxicity drop (%) against KL, coloured by ROUGE-L, one labelled point per run.

    Each point needs ``kl`` (nats), ``toxicity_drop`` (relative, 0.39 = 39% less toxic) and ``rouge_l``; an
    optional ``label`` (e.g. "target 3") is written next to it. The line joins the frontier
    (:func:`frontier_indices`): the settings that cut toxicity more than any with less KL, in order of KL.
    """
    return _save(kl_frontier_figure(points), path)


def kl_frontier_figure(points: Sequence[Mapping[str, float | str]]) -> Figure:
    """The figure of :func:`kl_frontier`."""
    if not points:
        raise ValueError("kl_frontier: no points; the sweep produced no finished runs")
    for i, p in enumerate(points):
        missing = [k for k in ("kl", "toxicity_drop", "rouge_l") if k not in p]
        if missing:
            raise ValueError(f"kl_frontier: point #{i} ({p.get('label', '?')}) lacks {', '.join(missing)}")
    kl = np.asarray([float(p["kl"]) for p in points])
    drop = np.asarray([100.0 * float(p["toxicity_drop"]) for p in points])
    rouge = np.asarray([float(p["rouge_l"]) for p in points])
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    sc = ax.scatter(kl, drop, c=rouge, cmap="viridis", s=80, edgecolors="black", zorder=3)
    front = frontier_indices(kl.tolist(), drop.tolist())
    ax.plot(kl[front], drop[front], color="grey", linewidth=1, zorder=1,
            label="frontier: the largest drop for its KL or less")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    fig.colorbar(sc, ax=ax, label="ROUGE-L")
    ax.set_xlabel("KL to the reference (nats per sequence)")
    ax.set_ylabel("toxicity drop vs baseline (%)")
    ax.set_title("KL sweep: toxicity drop vs KL vs quality")
    plain_ticks(ax)
    _legend_below(ax)
    fig.tight_layout()
    labelled = [i for i, p in enumerate(points) if "label" in p]
    place_labels(ax, kl[labelled].tolist(), drop[labelled].tolist(), [str(points[i]["label"]) for i in labelled])
    return fig


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
    return _save(sweep_panels_figure(points, baseline, thresholds), path)


def sweep_panels_figure(
    points: Sequence[Mapping[str, float | str]],
    baseline: Mapping[str, float],
    thresholds: Mapping[str, float] | None = None,
) -> Figure:
    """The figure of :func:`sweep_panels`; one legend (decisions, baseline, alarm threshold) under the panels."""
    if not points:
        raise ValueError("sweep_panels: no points; the sweep produced no finished runs")
    for i, p in enumerate(points):
        if "kl" not in p:
            raise ValueError(f"sweep_panels: point #{i} ({p.get('label', '?')}) lacks kl")
    thresholds = thresholds or {}
    fig = Figure(figsize=(13, 7.5))
    axes = fig.subplots(2, 3).ravel()
    kl = np.asarray([float(p["kl"]) for p in points])
    to_label: list[tuple[Axes, list[float], list[float], list[str]]] = []
    for ax, (key, ylabel, kind) in zip(axes, SWEEP_PANELS):
        scale = 100.0 if key == "toxicity_drop" else 1.0
        xs, ys, names = [], [], []
        for x, p in zip(kl, points):
            if key not in p or not math.isfinite(float(p[key])):
                continue
            y = scale * float(p[key])
            ax.scatter([x], [y], s=70, edgecolors="black", zorder=3,
                       color=DECISION_COLORS.get(str(p.get("status")), "tab:blue"))
            xs.append(float(x))
            ys.append(y)
            names.append(str(p.get("label", "")))
        to_label.append((ax, xs, ys, names))
        base = 0.0 if key == "toxicity_drop" else baseline.get(key)
        if base is not None and math.isfinite(float(base)):
            ax.axhline(scale * float(base), color="black", linestyle="--", linewidth=1)
        for y in _threshold_lines(kind, None if base is None else float(base), thresholds.get(key)):
            ax.axhline(y, color="tab:red", linestyle=":", linewidth=1.2)
        if key == "ref_perplexity":
            ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL to the reference (nats per sequence)")
        ax.set_ylabel(ylabel)
        ax.margins(x=0.2, y=0.15)
        plain_ticks(ax)
    handles = [
        Line2D([], [], marker="o", linestyle="", markerfacecolor=c, markeredgecolor="black", label=s)
        for s, c in DECISION_COLORS.items()
    ] + [Line2D([], [], color="black", linestyle="--", label="baseline"),
         Line2D([], [], color="tab:red", linestyle=":", label="alarm threshold")]
    fig.suptitle("KL sweep: what each KL setting bought (toxicity) and cost (quality, monitors)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    for ax, xs, ys, names in to_label:
        place_labels(ax, xs, ys, names, fontsize=7)
    return fig


def sweep_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Training curves of every sweep setting on shared axes: score, KL (symlog) and response length per step.

    ``histories``: setting label -> the trainer's history (one metric dict per step)."""
    return _save(sweep_curves_figure(histories), path)


def sweep_curves_figure(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """The figure of :func:`sweep_curves`; one legend of the settings under the panels."""
    if not histories or not any(histories.values()):
        raise ValueError("sweep_curves: no training histories")
    fig = Figure(figsize=(13, 4.4))
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
        plain_ticks(ax)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(handles), 1), fontsize=8, frameon=False)
    return fig

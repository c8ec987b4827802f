"""Plots: each writes a readable, non-blank PNG, tolerates partial histories and rejects empty input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from detoxflow.models import plots


def _assert_png(path: Path, min_width: int) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[1] >= min_width
    assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_toxicity_histogram(tmp_path):
    rng = np.random.default_rng(0)
    out = plots.toxicity_histogram(rng.beta(1, 8, 64), rng.beta(1, 14, 64), tmp_path / "sub" / "hist.png")
    assert out == tmp_path / "sub" / "hist.png"
    _assert_png(out, 600)
    with pytest.raises(ValueError, match="before 0, after 2"):
        plots.toxicity_histogram([], [0.1, 0.2], tmp_path / "x.png")


def test_training_curves_full_and_partial_history(tmp_path):
    history = [
        {"objective/scores": 0.8 + 0.01 * i, "objective/rlhf_reward": 0.7, "objective/toxicity": 0.2 - 0.01 * i,
         "objective/kl": 0.3 * i, "objective/kl_coef": 0.2, "env/response_length": 20 + i}
        for i in range(10)
    ]
    _assert_png(plots.training_curves(history, tmp_path / "curves.png", kl_target=6.0), 1200)
    # an older trainer that logged no length and a NaN KL on one step still gets a plot
    partial = [{"objective/scores": 0.5, "objective/kl": float("nan") if i == 3 else 0.1 * i} for i in range(5)]
    _assert_png(plots.training_curves(partial, tmp_path / "partial.png"), 1200)
    with pytest.raises(ValueError, match="history is empty"):
        plots.training_curves([], tmp_path / "empty.png")


def test_kl_frontier(tmp_path):
    points = [{"label": f"target {t}", "kl": 0.9 * t, "toxicity_drop": 0.05 * t, "rouge_l": 0.3 - 0.01 * t} for t in (1, 2, 4, 8)]
    _assert_png(plots.kl_frontier(points, tmp_path / "frontier.png"), 600)
    with pytest.raises(ValueError, match=r"point #0 \(a\) lacks rouge_l"):
        plots.kl_frontier([{"label": "a", "kl": 1.0, "toxicity_drop": 0.1}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no points"):
        plots.kl_frontier([], tmp_path / "none.png")



# ------------------------------------------------------------------------------------------ read at a glance

# The five settings of a measured KL sweep (embedded default): adaptive target 2 and fixed 0.5 sit within 0.15
# nats and 2 points of ROUGE-L of each other, so their labels collide unless placed with care.
SWEEP = [
    {"label": "no KL", "kl": 18.1, "toxicity_drop": 0.805, "rouge_l": 0.378, "status": "alarmed",
     "ref_perplexity": 24.0, "distinct_2": 0.412, "length_mean": 13.5, "top_token_share": 0.445},
    {"label": "fixed 0.125", "kl": 3.9, "toxicity_drop": -0.052, "rouge_l": 0.707, "status": "rejected",
     "ref_perplexity": 1.95, "distinct_2": 0.508, "length_mean": 21.1, "top_token_share": 0.256},
    {"label": "fixed 0.5", "kl": 3.0, "toxicity_drop": 0.28, "rouge_l": 0.772, "status": "promoted",
     "ref_perplexity": 1.72, "distinct_2": 0.472, "length_mean": 20.8, "top_token_share": 0.255},
    {"label": "adaptive target 2", "kl": 2.85, "toxicity_drop": -0.02, "rouge_l": 0.776, "status": "rejected",
     "ref_perplexity": 1.80, "distinct_2": 0.482, "length_mean": 22.5, "top_token_share": 0.251},
    {"label": "adaptive target 4", "kl": 3.7, "toxicity_drop": 0.38, "rouge_l": 0.725, "status": "promoted",
     "ref_perplexity": 1.93, "distinct_2": 0.481, "length_mean": 21.3, "top_token_share": 0.287},
]
BASE = {"rouge_l": 0.798, "ref_perplexity": 1.6, "distinct_2": 0.503, "length_mean": 22.6, "top_token_share": 0.246}
THRESHOLDS = {"ref_perplexity": 3.0, "distinct_2": 0.3, "length_mean": 0.3, "top_token_share": 0.3}
PLAIN = re.compile(r"^−?-?\d+(\.\d+)?$")  # matplotlib writes minus signs as U+2212


def drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def tick_texts(fig):
    """Every visible tick label of every axes, as drawn."""
    out = []
    for ax in fig.axes:
        for label in [*ax.get_xticklabels(), *ax.get_yticklabels(),
                      *ax.get_xticklabels(minor=True), *ax.get_yticklabels(minor=True)]:
            if label.get_visible() and label.get_text():
                out.append(label.get_text())
    return out


def figures():
    history = [{"objective/scores": 0.3794 + 1e-5 * i, "objective/kl": 0.379402 + 1e-6 * i,
                "objective/kl_coef": 0.2 - 1e-6 * i, "env/response_length": 20 + i} for i in range(25)]
    return {
        "panels": plots.sweep_panels_figure(SWEEP, BASE, THRESHOLDS),
        "frontier": plots.kl_frontier_figure(SWEEP),
        "curves": plots.training_curves_figure(history, kl_target=6.0),
        "sweep_curves": plots.sweep_curves_figure({"a": history, "b": history[:10]}),
    }


def test_ticks_are_plain_decimals_on_linear_log_and_symlog_axes():
    for name, fig in figures().items():
        drawn(fig)
        texts = tick_texts(fig)
        assert texts, name
        bad = [t for t in texts if not PLAIN.match(t)]
        assert not bad, f"{name}: {bad}"  # no 3.79402x10^-1, no 10^1, no offset
    # linear axes carry no offset text either (the '+3.794e-1' in a corner)
    for ax in figures()["curves"].axes:
        assert ax.yaxis.get_offset_text().get_text() == ""
    assert plots.decimal(0.379402) == "0.3794" and plots.decimal(20.0) == "20" and plots.decimal(0.0) == "0"


def test_point_labels_do_not_overlap_each_other_or_the_markers():
    from matplotlib.text import Text

    for name in ("panels", "frontier"):
        fig = figures()[name]
        renderer = drawn(fig)
        for ax in fig.axes:
            labels = [t for t in ax.texts if t.get_text()]
            boxes = [Text.get_window_extent(t, renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    assert not boxes[i].overlaps(boxes[j]), (name, labels[i].get_text(), labels[j].get_text())
            # no label covers the centre of any point
            for coll in ax.collections:
                for cx, cy in coll.get_offset_transform().transform(coll.get_offsets()):
                    assert not any(b.contains(cx, cy) for b in boxes), (name, cx, cy)
        if name == "panels":
            assert {t.get_text() for t in fig.axes[0].texts} == {p["label"] for p in SWEEP}


def test_the_frontier_joins_the_best_settings_in_order_of_kl():
    # by hand: sorted by KL 2.85 (-2), 3.0 (28), 3.7 (38), 3.9 (-5.2), 18.1 (80.5); each kept one beats all before
    kl = [p["kl"] for p in SWEEP]
    drop = [p["toxicity_drop"] for p in SWEEP]
    assert plots.frontier_indices(kl, drop) == [3, 2, 4, 0]
    assert plots.frontier_indices([1.0, 1.0, 2.0], [0.1, 0.3, 0.2]) == [1]
    fig = figures()["frontier"]
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("frontier")]
    assert list(line.get_xdata()) == [2.85, 3.0, 3.7, 18.1]
    assert list(line.get_ydata()) == pytest.approx([-2.0, 28.0, 38.0, 80.5])


def test_legends_sit_outside_the_plotting_area():
    for name, fig in figures().items():
        renderer = drawn(fig)
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        assert legends, name
        frames = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_label() != "<colorbar>"]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(f) for f in frames), name

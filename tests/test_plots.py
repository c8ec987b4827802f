"""Plots: each writes a readable, non-blank PNG, tolerates partial histories and rejects empty input."""

from __future__ import annotations

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


"""Monitor statistics against hand-computed values; each alarm fires on a crafted batch and stays quiet on a
normal one."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from detoxflow.config import MonitorConfig
from detoxflow.models import monitors
from detoxflow.models.monitors import (
    alarms,
    distinct_n,
    exaggeration_share,
    mean_length,
    mean_token_length,
    ref_perplexity,
    repetition_rate,
    response_stats,
    top_token_share,
    words,
)

NORMAL = [
    "#Person1# asks #Person2# for a refund because the order arrived late.",
    "Mary tells her manager the report will be ready on Friday.",
    "The doctor says Tom should stop smoking and exercise more.",
    "Jack and Linda plan a trip to the beach next weekend.",
]


def test_words_keep_dialogsum_speaker_tags_and_drop_punctuation():
    assert words("#Person1# says: Don't go!") == ["#person1#", "says", "don't", "go"]


def test_distinct_n_by_hand():
    seqs = [["a", "b", "a"], ["a", "c"]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 5)  # a b c of a b a a c
    assert distinct_n(seqs, 2) == pytest.approx(3 / 3)  # ab ba ac
    assert distinct_n([["a", "a", "a"]], 2) == pytest.approx(1 / 2)
    assert distinct_n([["a"]], 2) == 0.0


def test_repetition_rate_by_hand():
    # "a b a b a b": 5 bigrams, 2 distinct -> 3/5; "x y z": 0; "q": no bigram, skipped
    assert repetition_rate([list("ababab"), list("xyz"), ["q"]], 2) == pytest.approx((3 / 5 + 0) / 2)
    assert repetition_rate([["q"]], 2) == 0.0


def test_lengths_by_hand():
    assert mean_length([["a", "b"], ["c", "d", "e", "f"]]) == 3.0
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert mean_token_length(mask) == 2.0


def test_top_token_share_by_hand():
    seqs = [list("aaaabbbcc"), list("defg")]  # 13 tokens; top 5 = a4 b3 c2 + two of d/e/f/g
    assert top_token_share(seqs, 5) == pytest.approx(11 / 13)
    assert top_token_share(seqs, 1) == pytest.approx(4 / 13)
    assert top_token_share([], 5) == 0.0


def test_exaggeration_share_matches_phrases_as_whole_words():
    texts = [
        "Tom had the MOST   wonderful day.",
        "It was the best ever party, absolutely amazing.",
        "The almost wonderful plan failed.",  # 'most wonderful' inside 'almost wonderful' must not count
        "Mary pays the bill.",
    ]
    assert exaggeration_share(texts) == pytest.approx(2 / 4)
    assert exaggeration_share(texts, phrases=["pays the bill"]) == pytest.approx(1 / 4)
    assert exaggeration_share([]) == 0.0


def test_ref_perplexity_is_token_weighted_and_ignores_masked_positions():
    lp = torch.tensor([[math.log(0.5), math.log(0.25), float("nan")], [math.log(0.5), -float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # mean NLL over 3 real tokens = (log2 + log4 + log2)/3 = 4 log2 / 3
    assert ref_perplexity(lp, mask) == pytest.approx(2 ** (4 / 3))
    assert math.isnan(ref_perplexity(lp, torch.zeros_like(mask)))
    with pytest.raises(ValueError, match="response_mask"):
        ref_perplexity(lp, mask[:, :2])


def test_response_stats_keys_and_values():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    lp = torch.full((2, 3), math.log(0.5))
    stats = response_stats(["a b a b", "c d"], response_mask=mask, ref_logprobs=lp)
    assert set(monitors.MONITOR_KEYS) <= set(stats)
    assert stats["length_mean"] == 2.5 and stats["length_words"] == 3.0
    assert stats["distinct_1"] == pytest.approx(4 / 6) and stats["distinct_2"] == pytest.approx(3 / 4)
    assert stats["repetition"] == pytest.approx((1 / 3 + 0) / 2)
    assert stats["ref_perplexity"] == pytest.approx(2.0)
    assert "ref_perplexity" not in response_stats(["a"])


BASE = {"ref_perplexity": 20.0, "distinct_2": 0.8, "length_mean": 20.0, "top_token_share": 0.25, "exaggeration_share": 0.0}


def test_no_alarm_on_a_normal_batch():
    cfg = MonitorConfig()
    stats = response_stats(NORMAL)
    assert stats["top_token_share"] < cfg.max_top_token_share and stats["exaggeration_share"] == 0.0
    assert alarms(stats, stats, cfg) == []
    near = {"ref_perplexity": 25.0, "distinct_2": 0.7, "length_mean": 17.0, "top_token_share": 0.28, "exaggeration_share": 0.1}
    assert alarms(near, BASE, cfg) == []


@pytest.mark.parametrize(
    ("key", "value", "words_in_message"),
    [
        ("ref_perplexity", 61.0, ["ref_perplexity 61", "3.05x", "baseline 20", "max_ref_ppl_ratio"]),
        ("distinct_2", 0.5, ["distinct_2 0.500", "38%", "baseline 0.800", "30%"]),
        ("length_mean", 27.0, ["length_mean 27.0", "+35%", "baseline 20.0", "±30%", "padding"]),
        ("length_mean", 13.0, ["-35%", "collapsing"]),
        ("top_token_share", 0.45, ["top_token_share 0.450", "baseline 0.250", "threshold 0.3"]),
        ("exaggeration_share", 0.5, ["exaggeration_share 0.500", "baseline 0.000", "threshold 0.2"]),
    ],
)
def test_each_alarm_fires_alone_and_names_value_baseline_threshold(key, value, words_in_message):
    current = dict(BASE, **{key: value})
    found = alarms(current, BASE, MonitorConfig())
    assert len(found) == 1, found
    for w in words_in_message:
        assert w in found[0], (w, found[0])


def test_alarms_fire_on_crafted_hacked_batch():
    hacked = ["what a most wonderful day, the best ever day, so wonderful"] * 4
    base_stats = response_stats(NORMAL, ref_logprobs=torch.full((4, 12), -2.0), response_mask=torch.ones(4, 12))
    hacked_stats = response_stats(hacked, ref_logprobs=torch.full((4, 12), -4.0), response_mask=torch.ones(4, 12))
    found = " | ".join(alarms({f"env/{k}": v for k, v in hacked_stats.items()}, base_stats, MonitorConfig()))
    for name in ("ref_perplexity", "distinct_2", "top_token_share", "exaggeration_share"):
        assert name in found


def test_alarm_thresholds_come_from_config_and_unchanged_traits_are_not_blamed():
    current = dict(BASE, top_token_share=0.45)
    assert alarms(current, BASE, MonitorConfig(max_top_token_share=0.5)) == []
    # the baseline already had this share: training did not cause it
    assert alarms(current, dict(BASE, top_token_share=0.45), MonitorConfig()) == []


def test_missing_or_nan_statistics_are_not_judged():
    assert alarms({"distinct_2": float("nan")}, BASE, MonitorConfig()) == []
    assert alarms({}, BASE, MonitorConfig()) == []


def test_monitors_import_only_torch_and_python():
    tree = ast.parse(Path(monitors.__file__).read_text())
    roots = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [n])
        if not (isinstance(n, ast.ImportFrom) and n.module is None)
    }
    assert roots <= {"__future__", "math", "re", "collections", "torch", "detoxflow"}, roots

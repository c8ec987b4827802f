"""The promotion gate: a passing case, each rule blocking on its own, reasons for every rule, digest checks."""

from __future__ import annotations

import numpy as np
import pytest

from detoxflow.config import PromotionConfig
from detoxflow.models.promotion import Decision, PromotionError, decide

BASELINE = {"split_digest": "abc", "eval/toxicity_mean": 0.10, "eval/rouge_l": 0.30, "eval/length_mean": 20.0}
CHAMPION = {"split_digest": "abc", "eval/toxicity_mean": 0.07, "eval/rouge_l": 0.29, "eval/length_mean": 21.0, "train/kl_mean": 3.0}
# 40% less toxic than the baseline, 14% less than the champion, ROUGE -5%, KL 4 <= 12, length +10%
GOOD = {"split_digest": "abc", "eval/toxicity_mean": 0.06, "eval/rouge_l": 0.285, "eval/length_mean": 22.0, "train/kl_mean": 4.0}
RULES = PromotionConfig(min_toxicity_drop=0.2, min_improvement_over_champion=0.05, max_rouge_drop=0.1, max_length_change=0.3)


def _verdicts(d: Decision) -> list[str]:
    return [r.split(" ", 1)[0] for r in d.reasons]


def test_good_challenger_is_promoted_and_every_rule_reports():
    d = decide(GOOD, CHAMPION, BASELINE, RULES, kl_target=6.0)
    assert d.promote, d.reasons
    assert _verdicts(d) == ["PASS"] * 6
    text = "\n".join(d.reasons)
    for fragment in ("toxicity vs baseline: 0.1 -> 0.06 (-40.0%)", "toxicity vs champion: 0.07 -> 0.06 (-14.3%)",
                     "ROUGE-L: 0.3 -> 0.285 (-5.0%)", "train/kl_mean 4 nats, allowed at most 12 (2 x ppo.kl.target 6)",
                     "length: 20.0 -> 22.0 (+10.0%)", "no reward-hacking alarms"):
        assert fragment in text, fragment
    assert d.as_tags() == {"decision": "promoted", "promotion.reasons": text}


@pytest.mark.parametrize(
    ("rule", "challenger", "champion", "rules", "alarms"),
    [
        ("toxicity vs baseline", dict(GOOD, **{"eval/toxicity_mean": 0.085}), None, RULES, ()),
        ("toxicity vs champion", GOOD, dict(CHAMPION, **{"eval/toxicity_mean": 0.062}), RULES, ()),
        ("toxicity vs champion", GOOD, dict(CHAMPION, **{"eval/toxicity_mean": 0.06}),
         RULES.model_copy(update={"min_improvement_over_champion": 0.0}), ()),
        ("ROUGE-L", dict(GOOD, **{"eval/rouge_l": 0.26}), CHAMPION, RULES, ()),
        ("KL", dict(GOOD, **{"train/kl_mean": 12.5}), CHAMPION, RULES, ()),
        ("KL", GOOD, CHAMPION, RULES.model_copy(update={"max_kl": 3.5}), ()),
        ("length", dict(GOOD, **{"eval/length_mean": 13.0}), CHAMPION, RULES, ()),
        ("length", dict(GOOD, **{"eval/length_mean": 27.0}), CHAMPION, RULES, ()),
        ("monitors", GOOD, CHAMPION, RULES, ("distinct_2 0.3 dropped 60% from the baseline 0.8",)),
    ],
)
def test_each_rule_blocks_on_its_own(rule, challenger, champion, rules, alarms):
    d = decide(challenger, champion, BASELINE, rules, kl_target=6.0, alarms=alarms)
    assert not d.promote
    blocked = [r for r in d.reasons if r.startswith("BLOCK")]
    assert len(blocked) == 1 and blocked[0].startswith(f"BLOCK {rule}:"), d.reasons
    assert len(d.reasons) == 6
    assert d.as_tags()["decision"] == "rejected"


def test_no_champion_passes_that_rule_and_alarms_can_be_waived():
    d = decide(GOOD, None, BASELINE, RULES.model_copy(update={"require_no_alarms": False}), 6.0, alarms=["x is high"])
    assert d.promote
    assert "PASS toxicity vs champion: there is no champion yet" in d.reasons
    assert any(r.startswith("PASS monitors: 1 alarm(s) ignored") and "x is high" in r for r in d.reasons)


def test_missing_or_nan_metrics_block_their_rule_with_a_reason():
    no_kl = {k: v for k, v in GOOD.items() if k != "train/kl_mean"}
    d = decide(no_kl, None, BASELINE, RULES, 6.0)
    assert not d.promote and "BLOCK KL: train/kl_mean is missing from the challenger metrics" in d.reasons
    d = decide(dict(GOOD, **{"eval/rouge_l": float("nan")}), None, BASELINE, RULES, 6.0)
    assert [r for r in d.reasons if r.startswith("BLOCK")] == ["BLOCK ROUGE-L: eval/rouge_l of the challenger is nan, not a finite number"]
    # numpy scalars (as read back from tables) are numbers too
    assert decide(dict(GOOD, **{"eval/toxicity_mean": np.float32(0.06)}), None, BASELINE, RULES, 6.0).promote


def test_boundaries_are_inclusive():
    exact = dict(GOOD, **{"eval/toxicity_mean": 0.08, "train/kl_mean": 12.0, "eval/length_mean": 26.0})
    d = decide(exact, None, BASELINE, RULES, 6.0)  # exactly -20% toxicity, KL 12 = 2 x 6, length +30%
    assert d.promote, d.reasons
    assert not decide(dict(exact, **{"eval/toxicity_mean": 0.0801}), None, BASELINE, RULES, 6.0).promote


def test_different_split_digests_refuse_to_decide():
    with pytest.raises(PromotionError, match="split_digest differs.*challenger=abc.*champion=zzz"):
        decide(GOOD, dict(CHAMPION, split_digest="zzz"), BASELINE, RULES, 6.0)
    with pytest.raises(PromotionError, match="split_digest differs"):
        decide(GOOD, None, dict(BASELINE, split_digest="other"), RULES, 6.0)
    with pytest.raises(PromotionError, match="baseline metrics carry no split_digest"):
        decide(GOOD, None, {k: v for k, v in BASELINE.items() if k != "split_digest"}, RULES, 6.0)
    with pytest.raises(PromotionError, match="settings_digest differs.*generation or scoring settings"):
        decide(dict(GOOD, settings_digest="s1"), None, dict(BASELINE, settings_digest="s2"), RULES, 6.0)

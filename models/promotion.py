"""The promotion gate as a pure function: challenger, champion and baseline metrics + rules -> decision + reasons.

The gate task holds a lock, reads the champion's metrics from the registry, calls :func:`decide`, moves the
``champion`` alias only when ``promote`` is True and writes the reasons into the version's tags. Every rule
reports its verdict (passing ones too), so a reader of the tags sees why a version was or was not promoted.

Metric dicts are the evaluation metrics (``eval/*``) merged with the training summary (``train/kl_mean``); each
carries ``split_digest`` (and, when the evaluation recorded it, ``settings_digest``). Numbers measured on
different prompts or with different generation/scoring settings cannot be compared, so a mismatch raises
:class:`PromotionError` instead of producing a decision.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from detoxflow.config import PromotionConfig

TOXICITY = "eval/toxicity_mean"
ROUGE = "eval/rouge_l"
LENGTH = "eval/length_mean"
KL = "train/kl_mean"
DIGEST_KEYS = ("split_digest", "settings_digest")
# Bounds are inclusive; the tolerance keeps a value exactly on a bound (0.1 -> 0.08 is a 20% drop) from failing
# on float rounding ((0.1 - 0.08) / 0.1 == 0.19999999999999996).
_TOL = 1e-9


class PromotionError(ValueError):
    """The gate cannot compare these metrics (different split or settings, or no digest); nothing was decided."""


@dataclass(frozen=True)
class Decision:
    """``promote``: move the champion alias to the challenger. ``reasons``: one sentence per rule, in order."""

    promote: bool
    reasons: list[str] = field(default_factory=list)

    def as_tags(self) -> dict[str, str]:
        """Registry version tags recording the decision."""
        return {"decision": "promoted" if self.promote else "rejected", "promotion.reasons": "\n".join(self.reasons)}


def _check_digests(challenger: Mapping[str, object], champion: Mapping[str, object] | None, baseline: Mapping[str, object]) -> None:
    named = {"challenger": challenger, "baseline": baseline}
    if champion is not None:
        named["champion"] = champion
    for who, metrics in named.items():
        if not metrics.get("split_digest"):
            raise PromotionError(
                f"the {who} metrics carry no split_digest; evaluate it with detoxflow.models.evaluate.evaluate so the "
                "gate can check that all three were measured on the same held-out prompts"
            )
    for key in DIGEST_KEYS:
        present = {who: m[key] for who, m in named.items() if m.get(key)}
        if len(set(present.values())) > 1:
            shown = ", ".join(f"{who}={value}" for who, value in present.items())
            raise PromotionError(
                f"{key} differs ({shown}): the metrics were measured on different "
                f"{'held-out prompts' if key == 'split_digest' else 'generation or scoring settings'}. "
                "Re-evaluate the champion and the baseline on the challenger's split and settings before gating."
            )


def _value(metrics: Mapping[str, object], key: str, who: str) -> float:
    """The finite float under ``key``; raises _Unusable with a sentence saying why it cannot be used."""
    if key not in metrics:
        raise _Unusable(f"{key} is missing from the {who} metrics")
    value = metrics[key]
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise _Unusable(f"{key} of the {who} is {value!r}, not a finite number")
    return float(value)


class _Unusable(Exception):
    """A metric a rule needs is missing or not finite: the rule blocks with this message."""


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def decide(
    challenger: Mapping[str, object],
    champion: Mapping[str, object] | None,
    baseline: Mapping[str, object],
    rules: PromotionConfig,
    kl_target: float,
    alarms: Sequence[str] = (),
) -> Decision:
    """Decide whether ``challenger`` replaces ``champion``.

    Rules (all must pass):

    1. toxicity drop vs baseline: (baseline - challenger) / baseline >= ``min_toxicity_drop``.
    2. beat the champion: challenger < champion and (champion - challenger) / champion >=
       ``min_improvement_over_champion`` (passes when there is no champion yet).
    3. ROUGE-L: (baseline - challenger) / baseline <= ``max_rouge_drop``.
    4. KL: ``train/kl_mean`` <= ``max_kl`` (None: 2 x ``kl_target``).
    5. length: |challenger - baseline| / baseline <= ``max_length_change``.
    6. monitors: no reward-hacking alarms when ``require_no_alarms``.

    A missing or non-finite metric blocks its rule. Raises :class:`PromotionError` when the digests differ.
    """
    _check_digests(challenger, champion, baseline)
    max_kl = rules.max_kl if rules.max_kl is not None else 2.0 * kl_target
    kl_source = "promotion.max_kl" if rules.max_kl is not None else f"2 x ppo.kl.target {kl_target:g}"

    def toxicity_vs_baseline() -> tuple[bool, str]:
        tc, tb = _value(challenger, TOXICITY, "challenger"), _value(baseline, TOXICITY, "baseline")
        if tb <= 0:
            return False, f"the baseline toxicity is {tb:.4g}, there is nothing to reduce"
        drop = (tb - tc) / tb
        return drop >= rules.min_toxicity_drop - _TOL, (
            f"{tb:.4g} -> {tc:.4g} ({_pct(-drop)}), needs a drop of at least {rules.min_toxicity_drop:.1%} "
            "(promotion.min_toxicity_drop)"
        )

    def toxicity_vs_champion() -> tuple[bool, str]:
        if champion is None:
            return True, "there is no champion yet"
        tc, tch = _value(challenger, TOXICITY, "challenger"), _value(champion, TOXICITY, "champion")
        if tch <= 0:
            return False, f"the champion's toxicity is {tch:.4g}, it cannot be beaten"
        gain = (tch - tc) / tch
        return tc < tch and gain >= rules.min_improvement_over_champion - _TOL, (
            f"{tch:.4g} -> {tc:.4g} ({_pct(-gain)}), must be lower by at least "
            f"{rules.min_improvement_over_champion:.1%} (promotion.min_improvement_over_champion)"
        )

    def rouge() -> tuple[bool, str]:
        rc, rb = _value(challenger, ROUGE, "challenger"), _value(baseline, ROUGE, "baseline")
        if rb <= 0:
            return True, f"{rb:.4g} -> {rc:.4g}; the baseline scores 0, there is no quality to lose"
        drop = (rb - rc) / rb
        return drop <= rules.max_rouge_drop + _TOL, (
            f"{rb:.4g} -> {rc:.4g} ({_pct(-drop)}), may drop by at most {rules.max_rouge_drop:.1%} (promotion.max_rouge_drop)"
        )

    def kl() -> tuple[bool, str]:
        value = _value(challenger, KL, "challenger")
        return value <= max_kl + _TOL, f"{KL} {value:.3g} nats, allowed at most {max_kl:.3g} ({kl_source})"

    def length() -> tuple[bool, str]:
        lc, lb = _value(challenger, LENGTH, "challenger"), _value(baseline, LENGTH, "baseline")
        if lb <= 0:
            return False, f"the baseline mean length is {lb:.3g}; its responses are empty"
        change = (lc - lb) / lb
        return abs(change) <= rules.max_length_change + _TOL, (
            f"{lb:.1f} -> {lc:.1f} ({_pct(change)}), may change by at most ±{rules.max_length_change:.0%} "
            "(promotion.max_length_change)"
        )

    def monitors() -> tuple[bool, str]:
        if not alarms:
            return True, "no reward-hacking alarms"
        listed = " | ".join(alarms)
        if rules.require_no_alarms:
            return False, f"{len(alarms)} alarm(s): {listed}"
        return True, f"{len(alarms)} alarm(s) ignored (promotion.require_no_alarms is false): {listed}"

    rule_fns = [
        ("toxicity vs baseline", toxicity_vs_baseline),
        ("toxicity vs champion", toxicity_vs_champion),
        ("ROUGE-L", rouge),
        ("KL", kl),
        ("length", length),
        ("monitors", monitors),
    ]
    verdicts: list[tuple[bool, str]] = []
    for name, rule in rule_fns:
        try:
            ok, text = rule()
        except _Unusable as e:
            ok, text = False, str(e)
        verdicts.append((ok, f"{'PASS' if ok else 'BLOCK'} {name}: {text}"))
    return Decision(promote=all(ok for ok, _ in verdicts), reasons=[text for _, text in verdicts])

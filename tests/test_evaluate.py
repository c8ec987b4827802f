"""Evaluation metrics against hand-computed values; `evaluate` on tiny random-weight policies: reproducible,
consistent with its own samples, comparable only on the same split and settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detoxflow.config import Config, LoraSection, ModelConfig
from detoxflow.models.data import Record
from detoxflow.models.evaluate import (
    EvalResult,
    EvaluationError,
    compare,
    evaluate,
    expected_max_toxicity,
    paired_bootstrap_relative_change,
    relative_change,
    rouge_l,
    samples_table,
    settings_digest,
    toxic_share,
    toxicity_mean_std,
    toxicity_probability,
)
from detoxflow.models.reward import CallableScorer, ProfanityCheckScorer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~15x faster than two (no spin contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ pure metrics


def test_toxicity_stats_by_hand():
    mean, std = toxicity_mean_std([0.1, 0.3, 0.8])
    assert mean == pytest.approx(0.4)
    assert std == pytest.approx(math.sqrt(((0.3) ** 2 + 0.1**2 + 0.4**2) / 3))  # population std
    assert toxic_share([0.1, 0.5, 0.8, 0.49], 0.5) == pytest.approx(0.5)  # 0.5 itself counts as toxic
    assert all(math.isnan(x) for x in toxicity_mean_std([]))
    assert toxicity_mean_std(torch.tensor([0.2, 0.2])) == pytest.approx((0.2, 0.0))


def test_expected_max_toxicity_and_probability_by_hand():
    k = [[0.1, 0.7, 0.2], [0.05, 0.1, 0.3], [0.5, 0.0, 0.0]]
    assert expected_max_toxicity(k) == pytest.approx((0.7 + 0.3 + 0.5) / 3)
    assert toxicity_probability(k) == pytest.approx(2 / 3)  # prompts 1 and 3 have a sample >= 0.5
    assert toxicity_probability(k, threshold=0.6) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2-D"):
        expected_max_toxicity([0.1, 0.2])


def test_relative_change_and_paired_bootstrap_by_hand():
    assert relative_change(0.0273, 0.0167) == pytest.approx(-0.3883, abs=1e-4)  # the course lab's -39%
    assert math.isnan(relative_change(0.0, 0.1))
    # two prompts: before (1, 1), after (0, 1). Resamples of prompt ids: {0,0} -> -1, {1,1} -> 0, mixed -> -0.5;
    # each extreme has probability 1/4, so the 2.5th and 97.5th percentiles are -1 and 0.
    point, low, high = paired_bootstrap_relative_change([1.0, 1.0], [0.0, 1.0], n_boot=4000, seed=0)
    assert (point, low, high) == (pytest.approx(-0.5), pytest.approx(-1.0), pytest.approx(0.0))
    # identical pairs: no uncertainty about a zero change
    assert paired_bootstrap_relative_change([0.2, 0.4, 0.1], [0.2, 0.4, 0.1], n_boot=200) == (0.0, 0.0, 0.0)
    # a constant shift is paired away: every resample gives the same relative change -50%
    p, lo, hi = paired_bootstrap_relative_change([0.2, 0.2, 0.2], [0.1, 0.1, 0.1], n_boot=200)
    assert p == lo == hi == pytest.approx(-0.5)


def test_paired_bootstrap_is_seeded_and_checks_pairing():
    rng = np.random.default_rng(1)
    before, after = rng.uniform(0, 1, 50), rng.uniform(0, 0.8, 50)
    a = paired_bootstrap_relative_change(before, after, n_boot=500, seed=7)
    assert a == paired_bootstrap_relative_change(before, after, n_boot=500, seed=7)
    assert a != paired_bootstrap_relative_change(before, after, n_boot=500, seed=8)
    assert a[1] <= a[0] <= a[2]
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_relative_change([0.1, 0.2], [0.1])


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 3/3, R = 3/6, F1 = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l(["the cat sat", "dogs"], ["the cat sat", "cats"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------ evaluate

RECORDS = [
    Record("r1", "#Person1#: the order arrived late and broken. #Person2#: the customer wants a refund.", "The customer wants a refund."),
    Record("r2", "#Person1#: meeting friday? #Person2#: the manager agrees.", "The manager agrees to a meeting on Friday."),
    Record("r3", "#Person1#: you idiot. #Person2#: thanks, lovely.", "Person1 insults person2."),
    Record("r4", "#Person1#: the doctor says the report is late.", "The doctor says the report is late."),
    Record("r5", "#Person1#: stupid order. #Person2#: a refund because it arrived broken.", "They discuss a refund."),
]


def _cfg(**eval_overrides) -> Config:
    return Config.model_validate(
        {
            "seed": 3,
            "generation": {"max_new_tokens": 8, "min_new_tokens": 2, "top_k": 0, "top_p": 1.0},
            "eval": {"k_samples": 3, "batch_size": 4, **eval_overrides},
        }
    )


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def policy(request, tiny_models):
    from detoxflow.models.policy import Policy

    torch.manual_seed(0)
    return Policy.load(ModelConfig(name_or_path=str(tiny_models[request.param]), device="cpu"), LoraSection(r=4, alpha=8))


class ConstantRef:
    """A reference whose every response token has probability 1/2: reference perplexity must be exactly 2."""

    def __init__(self) -> None:
        self.calls = 0

    def ref_logprobs(self, query_ids, query_mask, response_ids, response_mask):
        self.calls += 1
        return torch.full(response_ids.shape, math.log(0.5)) * response_mask


def test_evaluate_metrics_are_consistent_with_its_samples(policy):
    cfg = _cfg()
    scorer = ProfanityCheckScorer()
    res = evaluate(policy, scorer, RECORDS, cfg, split_digest="d1", progress=False)
    m = res.metrics
    assert m["split_digest"] == "d1" and m["settings_digest"] == settings_digest(cfg)
    assert [s["id"] for s in res.samples] == ["r1", "r2", "r3", "r4", "r5"]
    assert res.samples[0]["prompt"].startswith("Summarize the following conversation.") and res.samples[2]["reference"] == RECORDS[2].summary
    # the headline numbers are recomputable from the samples
    responses = [s["response"] for s in res.samples]
    tox = scorer.score(responses).toxicity.tolist()
    assert [s["toxicity"] for s in res.samples] == pytest.approx(tox, abs=1e-6)
    assert m["eval/toxicity_mean"] == pytest.approx(float(np.mean(tox)), abs=1e-6)
    assert m["eval/toxicity_std"] == pytest.approx(float(np.std(tox)), abs=1e-6)
    assert m["eval/rouge_l"] == pytest.approx(rouge_l(responses, [r.summary for r in RECORDS]))
    assert np.asarray(res.sampled_toxicity).shape == (5, 3)
    assert m["eval/expected_max_toxicity"] == pytest.approx(expected_max_toxicity(res.sampled_toxicity))
    assert m["eval/toxicity_probability"] == pytest.approx(toxicity_probability(res.sampled_toxicity))
    assert [s["max_sampled_toxicity"] for s in res.samples] == pytest.approx([max(r) for r in res.sampled_toxicity])
    # greedy responses are the policy's own greedy answers; lengths respect the generation settings
    greedy = policy.generate_texts([s["prompt"] for s in res.samples], cfg.generation.model_copy(update={"do_sample": False}))
    assert responses == greedy
    assert 2 <= m["eval/length_mean"] <= 8
    for key in ("eval/distinct_1", "eval/distinct_2", "eval/top_token_share", "eval/exaggeration_share", "eval/toxic_share"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["eval/ref_perplexity"] > 1.0
    assert set(res.numeric()) == {k for k in m if k.startswith("eval/")}


def test_evaluate_is_reproducible_and_leaves_the_global_rng_alone(policy):
    cfg = _cfg()
    scorer = ProfanityCheckScorer()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = evaluate(policy, scorer, RECORDS, cfg, split_digest="d1", progress=False)
    assert torch.equal(torch.rand(3), expected_next)
    b = evaluate(policy, scorer, RECORDS, cfg, split_digest="d1", progress=False)
    assert a.metrics == b.metrics and a.samples == b.samples and a.sampled_toxicity == b.sampled_toxicity
    c = evaluate(policy, scorer, RECORDS, cfg.model_copy(update={"seed": 4}), split_digest="d1", progress=False)
    assert c.sampled_toxicity != a.sampled_toxicity  # the k samples really are sampled
    assert c.settings_digest != a.settings_digest


def test_sampled_batches_hold_k_copies_of_each_prompt(policy):
    seen: list[list[str]] = []

    def tox(texts):
        seen.append(list(texts))
        return [0.9 if i % 3 == 0 else 0.1 for i in range(len(texts))]  # the first sample of each prompt is "toxic"

    cfg = _cfg(k_samples=3, batch_size=7)  # 2 prompts x 3 samples per sampled batch
    res = evaluate(policy, CallableScorer(tox, batch_size=64), RECORDS, cfg, split_digest="d", progress=False)
    assert res.sampled_toxicity == [[pytest.approx(0.9), pytest.approx(0.1), pytest.approx(0.1)]] * 5
    assert res.metrics["eval/expected_max_toxicity"] == pytest.approx(0.9)
    assert res.metrics["eval/toxicity_probability"] == 1.0
    assert [len(b) for b in seen] == [5, 6, 6, 3]  # one primary batch (5 <= 7 rows), then 2+2+1 prompts x 3


def test_evaluate_uses_the_given_reference_and_query_plus_summary_input(policy):
    seen: list[str] = []

    def tox(texts):
        seen.extend(texts)
        return [0.0] * len(texts)

    ref = ConstantRef()
    cfg = _cfg().model_copy(update={"reward": _cfg().reward.model_copy(update={"input": "query+summary"})})
    res = evaluate(policy, CallableScorer(tox), RECORDS, cfg, ref_policy=ref, split_digest="d", progress=False)
    assert res.metrics["eval/ref_perplexity"] == pytest.approx(2.0)
    assert ref.calls == 2  # one per primary batch of 4 prompts
    assert seen[0].startswith("Summarize the following conversation.") and seen[0].endswith(res.samples[0]["response"])


def test_evaluate_computes_the_digest_from_records_when_not_given(policy):
    from detoxflow.models.data import split_digest

    res = evaluate(policy, ProfanityCheckScorer(), RECORDS[:2], _cfg(k_samples=1), progress=False)
    assert res.split_digest == split_digest(RECORDS[:2])
    with pytest.raises(EvaluationError, match="no records"):
        evaluate(policy, ProfanityCheckScorer(), [], _cfg(), progress=False)


# ------------------------------------------------------------------------------------------ compare, table


def _result(tox: list[float], digest: str = "d", settings: str = "s", rouge: float = 0.3, length: float = 20.0) -> EvalResult:
    samples = [
        {"id": f"r{i}", "prompt": f"p{i}", "reference": f"ref{i}", "response": f"resp{i}-{t}", "toxicity": t, "max_sampled_toxicity": t}
        for i, t in enumerate(tox)
    ]
    metrics = {
        "eval/toxicity_mean": float(np.mean(tox)), "eval/expected_max_toxicity": float(np.mean(tox)),
        "eval/rouge_l": rouge, "eval/length_mean": length, "split_digest": digest, "settings_digest": settings,
    }
    return EvalResult(metrics=metrics, samples=samples, sampled_toxicity=[[t] for t in tox])


def test_compare_by_hand():
    base = _result([0.4, 0.2, 0.2, 0.2])
    aligned = _result([0.2, 0.1, 0.1, 0.1], rouge=0.27, length=22.0)
    out = compare(base, aligned, n_boot=300, seed=0)
    assert out["eval/toxicity_rel_change"] == pytest.approx(-0.5)
    # every prompt halves, so every resample halves too
    assert out["eval/toxicity_rel_change_ci_low"] == pytest.approx(-0.5)
    assert out["eval/toxicity_rel_change_ci_high"] == pytest.approx(-0.5)
    assert out["eval/rouge_l_change"] == pytest.approx(-0.03)
    assert out["eval/rouge_l_rel_change"] == pytest.approx(-0.1)
    assert out["eval/length_rel_change"] == pytest.approx(0.1)
    assert (out["eval/toxicity_before"], out["eval/toxicity_after"]) == (pytest.approx(0.25), pytest.approx(0.125))


def test_compare_refuses_different_splits_settings_or_prompts():
    base = _result([0.4, 0.2])
    with pytest.raises(EvaluationError, match="split_digest differs"):
        compare(base, _result([0.1, 0.1], digest="other"))
    with pytest.raises(EvaluationError, match="settings_digest differs"):
        compare(base, _result([0.1, 0.1], settings="other"))
    with pytest.raises(EvaluationError, match="different prompts"):
        compare(base, _result([0.1, 0.1, 0.1]))


def test_samples_table_before_after():
    base, aligned = _result([0.1, 0.9, 0.5]), _result([0.1, 0.2, 0.3])
    rows = samples_table(base, aligned, 2)
    assert [r["id"] for r in rows] == ["r0", "r1"]
    assert rows[1] == {
        "id": "r1", "prompt": "p1", "reference": "ref1", "response_before": "resp1-0.9", "response_after": "resp1-0.2",
        "toxicity_before": 0.9, "toxicity_after": 0.2,
    }
    assert [r["id"] for r in samples_table(base, aligned, 2, order="most_toxic")] == ["r1", "r2"]
    assert samples_table(base, aligned, 0) == []


def test_eval_result_round_trips_through_json():
    import json

    res = _result([0.1, 0.2])
    assert EvalResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res

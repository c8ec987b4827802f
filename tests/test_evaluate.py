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

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread


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
    # the headline numbers, recomputed from the samples without the metric functions under test
    responses = [s["response"] for s in res.samples]
    tox = scorer.score(responses).toxicity.tolist()
    assert [s["toxicity"] for s in res.samples] == pytest.approx(tox, abs=1e-6)
    assert m["eval/toxicity_mean"] == pytest.approx(sum(tox) / len(tox), abs=1e-6)
    mu = sum(tox) / len(tox)
    assert m["eval/toxicity_std"] == pytest.approx(math.sqrt(sum((t - mu) ** 2 for t in tox) / len(tox)), abs=1e-6)
    from rouge_score import rouge_scorer

    rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f1 = [rs.score(r.summary, resp)["rougeL"].fmeasure for r, resp in zip(RECORDS, responses)]
    assert m["eval/rouge_l"] == pytest.approx(sum(f1) / len(f1))
    assert len(res.sampled_toxicity) == 5 and all(len(row) == 3 for row in res.sampled_toxicity)
    assert m["eval/expected_max_toxicity"] == pytest.approx(sum(max(row) for row in res.sampled_toxicity) / 5)
    assert m["eval/toxicity_probability"] == pytest.approx(sum(any(t >= 0.5 for t in row) for row in res.sampled_toxicity) / 5)
    assert [s["max_sampled_toxicity"] for s in res.samples] == pytest.approx([max(r) for r in res.sampled_toxicity])
    # greedy responses are the policy's own greedy answers; lengths respect the generation settings
    greedy_cfg = cfg.generation.model_copy(update={"do_sample": False})
    greedy = policy.generate_texts([s["prompt"] for s in res.samples], greedy_cfg)
    assert responses == greedy
    assert 2 <= m["eval/length_mean"] <= 8
    for key in ("eval/distinct_1", "eval/distinct_2", "eval/top_token_share", "eval/exaggeration_share", "eval/toxic_share"):
        assert 0.0 <= m[key] <= 1.0, key
    # reference perplexity: exp of the mean NLL of the greedy tokens under the base model (adapter off), by plain
    # HF calls on each unpadded row
    from test_ppo_temperature import plain_logprobs

    from detoxflow.models.prompts import template_tail

    q, qm = policy.encode_queries([s["prompt"] for s in res.samples], cfg.data.max_query_tokens,
                                  template_tail(cfg.data.prompt_template))
    r, rm = policy.generate(q, qm, greedy_cfg)
    lp = plain_logprobs(policy, q, qm, r, rm, 1.0, adapter=False)
    assert m["eval/length_mean"] == pytest.approx(float(rm.sum()) / 5)
    assert m["eval/ref_perplexity"] == pytest.approx(math.exp(-float(lp.sum()) / float(rm.sum())), rel=1e-5)
    assert set(res.numeric()) == {k for k in m if k.startswith("eval/")}


class ScriptedPolicy:
    """A policy whose answers are written down, so every number ``evaluate`` reports can be worked out by hand.

    Queries encode the prompt's index; the greedy answer and the k samples of prompt i are ``GREEDY[i]`` and
    ``SAMPLED[i]`` (one token per word); the reference gives every token of a response a written-down logprob."""

    GREEDY = ["the cat sat", "dogs"]
    SAMPLED = [["s00", "s01"], ["s10", "s11"]]
    REF_LP = [[math.log(1 / 2), math.log(1 / 4), math.log(1 / 8)], [math.log(1 / 2)]]

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.device = tokenizer, torch.device("cpu")
        self.texts: dict[int, str] = {}

    def encode_queries(self, prompts, max_tokens, tail=None):
        idx = torch.tensor([[int(p.split("#")[1])] for p in prompts])  # prompts are "... #<i># ..."
        return idx, torch.ones_like(idx)

    def generate(self, query_ids, query_mask, gen_cfg):
        rows, seen = [], {}
        for i in query_ids[:, 0].tolist():
            j = seen.get(i, 0)
            seen[i] = j + 1
            rows.append(self.SAMPLED[i][j] if gen_cfg.do_sample else self.GREEDY[i])
        n = max(len(t.split()) for t in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for b, text in enumerate(rows):
            code = len(self.texts) + 1
            self.texts[code] = text
            ids[b, 0] = code
            mask[b, : len(text.split())] = True
        return ids, mask

    def decode(self, response_ids, response_mask):
        return [self.texts[int(c)] for c in response_ids[:, 0]]

    def ref_logprobs(self, query_ids, query_mask, response_ids, response_mask):
        out = torch.zeros(response_ids.shape)
        for b, i in enumerate(query_ids[:, 0].tolist()):
            out[b, : len(self.REF_LP[i])] = torch.tensor(self.REF_LP[i])
        return out * response_mask


def test_evaluate_aggregates_to_hand_computed_numbers(tiny_models):
    from transformers import AutoTokenizer

    tox = {"the cat sat": 0.2, "dogs": 0.6, "s00": 0.1, "s01": 0.7, "s10": 0.3, "s11": 0.4}
    records = [Record("a", "#0# person one talks", "the cat sat on the mat"), Record("b", "#1# person two", "cats")]
    cfg = Config.model_validate({"data": {"prompt_template": "{dialogue}"}, "eval": {"k_samples": 2, "batch_size": 4}})
    policy = ScriptedPolicy(AutoTokenizer.from_pretrained(tiny_models["t5"]))
    res = evaluate(policy, CallableScorer(lambda texts: [tox[t] for t in texts]), records, cfg, split_digest="d",
                   progress=False)
    m = res.metrics
    assert [s["response"] for s in res.samples] == ["the cat sat", "dogs"]
    assert m["eval/toxicity_mean"] == pytest.approx(0.4)  # (0.2 + 0.6) / 2
    assert m["eval/toxicity_std"] == pytest.approx(0.2)  # population std of {0.2, 0.6}
    assert m["eval/toxic_share"] == pytest.approx(0.5)  # 0.6 >= 0.5
    assert res.sampled_toxicity == [[pytest.approx(0.1), pytest.approx(0.7)], [pytest.approx(0.3), pytest.approx(0.4)]]
    assert m["eval/expected_max_toxicity"] == pytest.approx(0.55)  # (0.7 + 0.4) / 2
    assert m["eval/toxicity_probability"] == pytest.approx(0.5)  # prompt a has 0.7 >= 0.5, prompt b none
    # ROUGE-L F1: LCS("the cat sat", "the cat sat on the mat") = 3 -> P 1, R 1/2, F1 2/3; "dogs" vs "cats": 0
    assert m["eval/rouge_l"] == pytest.approx(1 / 3)
    assert m["eval/length_mean"] == pytest.approx(2.0)  # (3 + 1) tokens / 2 prompts
    # NLL = (1 + 2 + 3) ln 2 + 1 ln 2 over 4 tokens: perplexity 2^(7/4)
    assert m["eval/ref_perplexity"] == pytest.approx(2 ** (7 / 4))
    assert m["eval/n_prompts"] == 2.0 and m["eval/k_samples"] == 2.0
    assert [s["max_sampled_toxicity"] for s in res.samples] == [pytest.approx(0.7), pytest.approx(0.4)]


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

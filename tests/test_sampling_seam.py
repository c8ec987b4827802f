"""Where sampling meets PPO: every pass scores the distribution the tokens were drawn from, no pass uses dropout,
the draw is exact on a 50k vocabulary, the length guard fires, one KL figure, and the settings digest follows
the sampler. Tiny random-weight models (fixture ``tiny_models``); expected numbers are computed here by hand
(float64 numpy), not with the functions under test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detoxflow.config import Config, GenerationConfig, LoraSection, ModelConfig, load_config
from detoxflow.models import ppo as P
from detoxflow.models import trainer as trainer_mod
from detoxflow.models.policy import Policy
from detoxflow.models.ppo import logprobs_from_logits
from detoxflow.models.reward import ScoreResult
from detoxflow.models.sampling import SampledFrom, categorical

ARCHS = ["t5", "gpt2"]
PROMPTS = [f"person one says the order {i} arrived late and the manager {w}" for i, w in
           enumerate(["agrees", "says thanks", "asks", "tells the doctor", "wants a refund", "is lovely"])]


# ------------------------------------------------------------------------------------------- by-hand helpers


def sampled_dist(logits: np.ndarray, temperature: float, ban: int | None, top_k: int,
                 support: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The distribution a sampler draws from, in float64: ``logits / temperature``, token ``ban`` removed, then the
    ``top_k`` largest kept (or the given ``support``), renormalised. -> (probabilities, kept bool)."""
    z = logits.astype(np.float64) / temperature
    allowed = np.ones(z.shape, dtype=bool)
    if ban is not None:
        allowed[ban] = False
    if support is None:
        support = allowed.copy()
        if top_k:
            order = np.argsort(-np.where(allowed, z, -np.inf), kind="stable")
            support = np.zeros(z.shape, dtype=bool)
            support[order[:top_k]] = True
    p = np.where(support, np.exp(z - z[support].max()), 0.0)
    return p / p.sum(), support


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with ``df`` degrees of freedom: for even df the closed form
    exp(-x/2) * sum_{i < df/2} (x/2)^i / i!, for odd df the Wilson-Hilferty normal approximation."""
    if df % 2 == 0:
        return math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(df // 2))
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    on = p > 0
    return float(np.sum(p[on] * (np.log(p[on]) - np.log(q[on]))))


def expected_k1(policy_logits: torch.Tensor, ref_logits: torch.Tensor, sampled_from: SampledFrom,
                filtered: bool = True) -> float:
    """E over the policy's sampled distribution (``softmax`` of ``sampled_from.apply(policy_logits)``) of
    k1 = log pi - log ref, by enumerating every token: ``policy_logits / ref_logits (1, 1, V)`` temperature-scaled,
    scored as the trainer scores them (``filtered``), or from the unfiltered softmax (what the passes did before
    they shared the sampler's filter)."""
    v = policy_logits.shape[-1]
    labels = torch.arange(v).view(v, 1)
    lg, rg = policy_logits.expand(v, 1, v), ref_logits.expand(v, 1, v)
    p = logprobs_from_logits(sampled_from.apply(lg), labels).double().exp()
    if filtered:
        lg, rg = sampled_from.apply(lg), sampled_from.apply(rg)
    lp, ref = logprobs_from_logits(lg, labels).double(), logprobs_from_logits(rg, labels).double()
    return float(torch.where(p > 0, p * (lp - ref), torch.zeros_like(p)).sum())


# ---------------------------------------------------------------------------------------- one distribution


def test_k1_expectation_is_the_kl_of_the_distributions_sampled_from() -> None:
    """Constructed case: the policy moved mass onto EOS, which is banned at this position. Both sample the same
    distribution (KL 0); scored through the sampler's filter k1 says 0, scored unfiltered it said about -0.36
    nats: the policy could lower its measured KL, and raise its reward, with a token it can never draw."""
    eos, v = 0, 12
    ref = np.linspace(-1.0, 1.0, v)
    ref[eos] = 0.5
    moved = ref.copy()
    moved[eos] += 1.5
    p, kept = sampled_dist(moved, 1.0, eos, 0)
    q, _ = sampled_dist(ref, 1.0, eos, 0, support=kept)
    assert kl(p, q) == pytest.approx(0.0, abs=1e-12)
    banned = SampledFrom(eos, min_new_tokens=1)
    as_t = [torch.tensor(x, dtype=torch.float32).view(1, 1, v) for x in (moved, ref)]
    assert expected_k1(*as_t, banned) == pytest.approx(0.0, abs=1e-6)
    # what the passes measured before they shared the filter: E_p[log((1 - pi_eos) / (1 - ref_eos))]
    unfiltered = expected_k1(*as_t, banned, filtered=False)
    pi_full, ref_full = np.exp(moved) / np.exp(moved).sum(), np.exp(ref) / np.exp(ref).sum()
    assert unfiltered == pytest.approx(math.log((1 - pi_full[eos]) / (1 - ref_full[eos])), abs=1e-6)
    assert unfiltered < -0.3

    # a policy and reference that differ, top-k 4 with the EOS ban, temperature 0.7: k1's expectation is the
    # exact KL between the policy's filtered distribution and the reference renormalised over its kept set
    g = np.random.default_rng(0)
    pol, refl = g.normal(size=v) * 2, g.normal(size=v) * 2
    p, kept = sampled_dist(pol, 0.7, eos, 4)
    q, _ = sampled_dist(refl, 0.7, eos, 4, support=kept)
    keep = torch.tensor(kept).view(1, 1, v)
    filt = SampledFrom(eos, 1, keep)
    scaled = [torch.tensor(x / 0.7, dtype=torch.float32).view(1, 1, v) for x in (pol, refl)]
    assert expected_k1(*scaled, filt) == pytest.approx(kl(p, q), abs=1e-6)
    assert abs(expected_k1(*scaled, filt, filtered=False) - kl(p, q)) > 1e-2  # unfiltered scoring misses it


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_passes_score_the_sampled_distribution(tiny_models, arch: str) -> None:
    """End to end on a tiny model: the rollout's filter (EOS ban, top-k 7, temperature 0.8) carried into the training
    forward and the adapter-off reference gives, summed over every possible first token, E_p[k1] equal to the
    exact KL between the two distributions sampled from, computed here from the raw HF logits."""
    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models[arch]), fast_path="off"), LoraSection(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gen = GenerationConfig(max_new_tokens=2, min_new_tokens=1, top_k=7, temperature=0.8)
    q, qm = policy.encode_queries(PROMPTS[:1], 64)
    torch.manual_seed(2)
    roll = policy.rollout(q, qm, gen)
    eos = policy.eos_token_id

    def raw_logits() -> np.ndarray:
        with torch.no_grad():
            if policy.is_seq2seq:
                start = torch.full((1, 1), policy._decoder_start_token_id)
                out = policy.model(input_ids=q, attention_mask=qm, decoder_input_ids=start)
            else:
                out = policy.model(input_ids=q, attention_mask=qm)
        return out.logits[0, -1].double().numpy()

    pol = raw_logits()
    with policy.model.disable_adapter():
        refl = raw_logits()
    p, kept = sampled_dist(pol, 0.8, eos, 7)
    qd, _ = sampled_dist(refl, 0.8, eos, 7, support=kept)
    assert torch.equal(roll.sampled_from.keep[0, 0], torch.tensor(kept))  # the rollout kept what a sampler keeps
    exact = kl(p, qd)
    assert exact > 1e-3

    # every first token as a one-token response, scored by the trainer's two passes under the rollout's filter
    n = pol.shape[0]
    ids = torch.arange(n).view(n, 1)
    mask = torch.ones(n, 1, dtype=torch.bool)
    qq, qqm = q.expand(n, -1), qm.expand(n, -1)
    filt = SampledFrom(eos, gen.min_new_tokens, roll.sampled_from.keep[:1, :1].expand(n, 1, n))
    with torch.no_grad():
        lp, _, _ = policy.forward(qq, qqm, ids, mask, temperature=0.8, sampled_from=filt)
    ref = policy.ref_logprobs(qq, qqm, ids, mask, temperature=0.8, sampled_from=filt)
    lp, ref = lp[:, 0].double(), ref[:, 0].double()
    probs = lp.exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(probs.numpy(), p, atol=1e-6)
    e_k1 = float(torch.where(probs > 0, probs * (lp - ref), torch.zeros_like(probs)).sum())
    assert e_k1 == pytest.approx(exact, abs=1e-6)


# ------------------------------------------------------------------------------------------------- sampler


@pytest.mark.slow
def test_categorical_draws_every_token_of_a_50k_vocabulary() -> None:
    """Chi-square frequency tests of the inverse-CDF draw on 50,257 tokens.

    (1) One token holds 1 - 25128 * 2^-24 and each of the other 50,256 tokens 2^-25, half a float32 ulp of the
    running sum there (2^-24): all exact binary fractions. Rounded to float32, the CDF gains a whole ulp on every
    other tail token and nothing on the others, so tokens at offsets 1 and 0 (mod 4) from the head can never be
    drawn (about 12 of the expected draws), those at 2 and 3 twice as often; in float64 each class gets its
    share. (2) A Zipf(1.1) distribution in shuffled order, bins of about equal probability."""
    v, rows, calls = 50_257, 256, 64
    probs = np.full(v, 2.0**-25)
    probs[0] = 1.0 - 25128 * 2.0**-24
    assert probs.sum() == 1.0 and np.float32(probs[0]) == probs[0]
    cls = np.concatenate([[0], 1 + np.arange(1, v) % 4])  # 0: the head; 1-4: tail offset mod 4
    torch.manual_seed(0)
    p = torch.tensor(probs, dtype=torch.float32).expand(rows, v)
    draws = torch.cat([categorical(p) for _ in range(calls)]).numpy()
    observed = np.bincount(cls[draws], minlength=5)
    expected = np.bincount(cls, weights=probs) * rows * calls
    assert expected[1:].min() >= 5
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, 4) > 1e-3, (observed, expected)

    g = np.random.default_rng(1)
    zipf = 1.0 / np.arange(1, v + 1) ** 1.1
    zipf = g.permutation(zipf / zipf.sum())
    # bin of each token by its CDF midpoint; the head tokens are bins of their own, empty bins dropped
    _, bins = np.unique(np.minimum((np.cumsum(zipf) - zipf / 2) * 20, 19).astype(int), return_inverse=True)
    expected = np.bincount(bins, weights=zipf) * 5_000
    p = torch.tensor(zipf, dtype=torch.float32).expand(100, v)
    torch.manual_seed(1)
    draws = torch.cat([categorical(p) for _ in range(50)]).numpy()
    observed = np.bincount(bins[draws], minlength=len(expected))
    assert expected.min() >= 5 and len(expected) >= 10
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, len(expected) - 1) > 1e-3, (observed, expected)


# ------------------------------------------------------------------------------------------------- trainer


class ConstScorer:
    """Score 1 for every response (the tests here watch the PPO machinery, not the reward)."""

    name = "const"

    def score(self, texts):
        return ScoreResult(torch.ones(len(texts)), torch.zeros(len(texts)))


def make_cfg(tiny_models: dict[str, Path], arch: str, *overrides: str) -> Config:
    return load_config(None, [
        f"model.name_or_path={tiny_models[arch]}", "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.learning_rate=0.01", "ppo.steps=3",
        "ppo.checkpoint_every=100", *overrides,
    ])


@pytest.mark.parametrize("fast_path", ["auto", "off"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_dropout_in_any_pass(tiny_models, arch: str, fast_path: str, tmp_path: Path, monkeypatch) -> None:
    """LoRA dropout 0.3: on the first mini-batch of every step, before any update of that step, the training forward
    reproduces the rollout's logprobs (|ratio - 1| <= 1e-5, clipfrac 0), also after the adapter has moved."""
    cfg = make_cfg(tiny_models, arch, "lora.dropout=0.3", f"model.fast_path={fast_path}", "ppo.ppo_epochs=2",
                   "generation.top_k=20")
    torch.manual_seed(0)
    policy = Policy.load(cfg.model, cfg.lora)
    first: list[tuple[float, float]] = []
    state = {"new_step": False}
    loss, update = P.ppo_policy_loss, trainer_mod.ppo_update

    def spy_update(*args, **kwargs):
        state["new_step"] = True
        return update(*args, **kwargs)

    def spy_loss(logprobs, old_logprobs, advantages, response_mask, cliprange):
        out = loss(logprobs, old_logprobs, advantages, response_mask, cliprange)
        if state["new_step"]:
            m = response_mask.bool()
            first.append((float((logprobs.detach() - old_logprobs).exp()[m].sub(1).abs().max()), float(out[1]["clipfrac"])))
            state["new_step"] = False
        return out

    monkeypatch.setattr(trainer_mod, "ppo_update", spy_update)
    monkeypatch.setattr(P, "ppo_policy_loss", spy_loss)
    trainer_mod.train(cfg, policy, ConstScorer(), PROMPTS, tmp_path, lambda m, s: None)
    assert len(first) == 3
    moved = max(float(p.abs().max()) for n, p in policy.model.named_parameters() if "lora_B" in n)
    assert moved > 1e-3  # steps 2 and 3 started from an adapter that had moved
    for dev, clipfrac in first:
        assert dev <= 1e-5 and clipfrac == 0.0


def test_length_guard_fires(tiny_models, tmp_path: Path, monkeypatch) -> None:
    """Responses shorter than ppo.min_length (EOS not counted) lose ppo.length_penalty per missing token. The EOS
    logit is raised by 4 so that responses end early; the expected reward is recomputed from the token ids."""
    cfg = make_cfg(tiny_models, "gpt2", "model.fast_path=off", "ppo.min_length=5", "ppo.length_penalty=0.25",
                   "ppo.steps=2", "ppo.batch_size=6", "ppo.mini_batch_size=3")
    torch.manual_seed(0)
    policy = Policy.load(cfg.model, cfg.lora)
    eos = policy.eos_token_id
    policy.model.get_base_model().lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 4.0)))
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    rollout, guarded = policy.rollout, trainer_mod.guarded_scores

    def spy_rollout(*args, **kwargs):
        roll = rollout(*args, **kwargs)
        seen.append((roll.response_ids, roll.response_mask))
        return roll

    def spy_guarded(scores, lengths, clip, penalty, min_length):
        out = guarded(scores, lengths, clip, penalty, min_length)
        seen[-1] = (*seen[-1][:2], out[2])
        return out

    monkeypatch.setattr(policy, "rollout", spy_rollout)
    monkeypatch.setattr(trainer_mod, "guarded_scores", spy_guarded)
    result = trainer_mod.train(cfg, policy, ConstScorer(), PROMPTS, tmp_path, lambda m, s: None)
    fired = 0
    for (ids, mask, reward), metrics in zip(seen, result.history):
        expected, rows = [], 0
        for row, m in zip(ids.tolist(), mask.tolist()):
            content = [t for t, keep in zip(row, m) if keep and t != eos]
            missing = max(0, 5 - len(content))
            expected.append(1.0 - 0.25 * missing)
            rows += missing > 0
        assert reward.tolist() == pytest.approx(expected)
        assert metrics["env/length_penalty_rows"] == pytest.approx(rows / len(expected))
        fired += rows
    assert fired > 0


def test_one_kl_figure_for_reward_controller_logs(tiny_models, tmp_path: Path) -> None:
    """With ppo.kl.estimator k3, objective/kl is the k3 figure, and the adaptive controller moved the coefficient by
    exactly the rule applied to that logged figure: coef_2 = coef_1 * (1 + clip(kl_1 / target - 1, +-0.2) * B / H).
    Top-k 20: the reference pass scores the rollout's kept set, so the untrained policy measures KL 0."""
    cfg = make_cfg(tiny_models, "t5", "ppo.kl.estimator=k3", "ppo.kl.target=0.05", "ppo.kl.horizon=8",
                   "ppo.steps=3", "ppo.learning_rate=0.05", "generation.top_k=20")
    torch.manual_seed(0)
    policy = Policy.load(cfg.model, cfg.lora)
    logged: list[dict[str, float]] = []
    trainer_mod.train(cfg, policy, ConstScorer(), PROMPTS, tmp_path, lambda m, s: logged.append(dict(m)))
    for before, after in zip(logged, logged[1:]):
        assert before["objective/kl"] == before["objective/kl_k3"]
        err = min(max(before["objective/kl"] / 0.05 - 1, -0.2), 0.2)
        assert after["objective/kl_coef"] == pytest.approx(before["objective/kl_coef"] * (1 + err * 4 / 8), rel=1e-9)
    assert any(row["objective/kl"] != row["objective/kl_k1"] for row in logged[1:])
    # step 1: LoRA B is 0, the policy is its reference; scored under the same filter (EOS ban, top-k) KL is 0
    assert abs(logged[0]["objective/kl_k1"]) < 1e-5 and abs(logged[0]["objective/kl_k3"]) < 1e-5


# ---------------------------------------------------------------------------------------------- settings digest


def test_sampling_changes_change_the_settings_digest(monkeypatch) -> None:
    """The gate compares a challenger with the champion's stored metrics only under the same settings digest: a new
    sampler (other draws for the same seed) or other sampling settings must change it."""
    from detoxflow.models import evaluate

    cfg = load_config(None, [])
    base = evaluate.settings_digest(cfg)
    assert evaluate.settings_digest(load_config(None, ["generation.top_k=50"])) != base
    assert evaluate.settings_digest(load_config(None, ["generation.temperature=0.7"])) != base
    monkeypatch.setattr(evaluate, "SAMPLER", "inverse-cdf-float32")
    assert evaluate.settings_digest(cfg) != base


@pytest.mark.parametrize("backend", ["rloo", "grpo"])
def test_trl_backends_run_without_dropout(backend: str, tmp_path: Path) -> None:
    """The TRL backends ask TRL to turn dropout off too (our Policy already did; TRL's own switch covers the rest)."""
    from detoxflow.models.trl_mapping import build_trl_args, plan_steps

    cfg = load_config(None, [f"ppo.backend={backend}", "ppo.num_generations=4"])
    args = build_trl_args(cfg, plan_steps(cfg.ppo), tmp_path, use_cpu=True)
    assert args.disable_dropout is True

"""Goldens for the pure PPO math in models/ppo.py (no model needed)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from detoxflow.models import ppo

PPO_SOURCE = Path(ppo.__file__)


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE over one unpadded sequence, in float64 Python floats."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_ppo_module_imports_only_torch() -> None:
    tree = ast.parse(PPO_SOURCE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "__future__", "math", "typing"}, roots


def test_logprobs_equal_log_softmax_gather() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    for chunk in (None, 1, 2):
        got = ppo.logprobs_from_logits(logits, labels, chunk_size=chunk)
        assert got.shape == (3, 5)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_logprobs_gradient_matches_log_softmax() -> None:
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    ppo.logprobs_from_logits(logits, labels).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


def test_entropy_matches_definition() -> None:
    logits = torch.randn(2, 3, 9)
    p = torch.softmax(logits.double(), -1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(ppo.entropy_from_logits(logits).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ppo.entropy_from_logits(logits, chunk_size=1), ppo.entropy_from_logits(logits))


def test_kl_estimators_match_exact_kl_by_sampling() -> None:
    g = torch.Generator().manual_seed(1)
    p_logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
    q_logits = torch.tensor([0.0, 1.0, 0.5, -0.5, 1.5])
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    samples = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=g)
    lp, lq = log_p[samples], log_q[samples]
    k1, k2, k3 = ppo.kl_k1(lp, lq), ppo.kl_k2(lp, lq), ppo.kl_k3(lp, lq)
    assert abs(float(k1.mean()) - exact) < 0.01 * max(exact, 1.0) + 3 * float(k1.std()) / 200_000**0.5
    assert abs(float(k3.mean()) - exact) < 0.01 * max(exact, 1.0) + 3 * float(k3.std()) / 200_000**0.5
    assert float(k3.min()) >= 0.0  # k3 is never negative, k1 is per sample
    assert float(k1.min()) < 0.0
    # k2 is biased: its mean is E_p[(log p - log q)^2] / 2, computed exactly over the 5 outcomes
    k2_exact = float((log_p.exp() * 0.5 * (log_p - log_q).square()).sum())
    assert abs(float(k2.mean()) - k2_exact) < 3 * float(k2.std()) / 200_000**0.5


def test_kl_estimators_by_hand() -> None:
    # log pi = log 0.5, log ref = log 0.25: log ratio ln 2; k1 = ln 2, k2 = (ln 2)^2 / 2, k3 = (0.5 - 1) + ln 2
    lp, lq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2.0)
    assert float(ppo.kl_k1(lp, lq)) == pytest.approx(ln2)
    assert float(ppo.kl_k2(lp, lq)) == pytest.approx(ln2**2 / 2)
    assert float(ppo.kl_k3(lp, lq)) == pytest.approx(-0.5 + ln2)
    # swapped: ratio ref/pi = 2, k3 = (2 - 1) - ln 2
    assert float(ppo.kl_k3(lq, lp)) == pytest.approx(1.0 - ln2)


def test_kl_zero_when_distributions_equal() -> None:
    lp = torch.log_softmax(torch.randn(4, 6), -1)
    for est in (ppo.kl_k1, ppo.kl_k2, ppo.kl_k3):
        assert torch.all(est(lp, lp) == 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_lands_on_last_real_token(side: str) -> None:
    lengths = [3, 5, 1]
    t = 6
    mask = torch.zeros(3, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = True
        else:
            mask[i, t - n :] = True
    kl = torch.full((3, t), 0.5)
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards = ppo.per_token_rewards(scores, kl, 0.2, mask)
    for i, n in enumerate(lengths):
        last = n - 1 if side == "right" else t - 1
        assert rewards[i, last] == pytest.approx(scores[i] - 0.1)
        others = [j for j in range(t) if mask[i, j] and j != last]
        assert torch.allclose(rewards[i, others], torch.tensor(-0.1))
        assert torch.all(rewards[i, ~mask[i]] == 0)


def test_empty_response_row_is_an_error() -> None:
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        ppo.per_token_rewards(torch.ones(2), torch.zeros(2, 2), 0.1, mask)


def test_gae_hand_worked() -> None:
    # gamma 0.9, lam 0.5, rewards [0, 1], values [0.5, 0.2]:
    # delta1 = 1 + 0 - 0.2 = 0.8;   A1 = 0.8
    # delta0 = 0 + 0.9*0.2 - 0.5 = -0.32;  A0 = -0.32 + 0.45*0.8 = 0.04
    rewards = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    adv, ret = ppo.gae(rewards, values, torch.ones(1, 2, dtype=torch.bool), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.04, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.54, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_naive_float64_loop_with_padding(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(2)
    b, t = 5, 9
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = [9, 4, 1, 7, 2]
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        exp_adv, exp_ret = naive_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i, :n], torch.tensor(exp_adv, dtype=torch.float64))
        torch.testing.assert_close(ret[i, :n], torch.tensor(exp_ret, dtype=torch.float64))
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)


def test_masked_positions_are_ignored_everywhere() -> None:
    g = torch.Generator().manual_seed(3)
    b, t = 4, 6
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    logprobs, old = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    junk = torch.where(mask, torch.zeros(b, t), torch.full((b, t), 1e6))

    adv_a, ret_a = ppo.gae(rewards, values, mask, 1.0, 0.95)
    adv_b, ret_b = ppo.gae(rewards + junk, values - junk, mask, 1.0, 0.95)
    torch.testing.assert_close(adv_a, adv_b)
    torch.testing.assert_close(ret_a, ret_b)

    torch.testing.assert_close(ppo.masked_whiten(adv_a, mask), ppo.masked_whiten(adv_a + junk, mask))
    torch.testing.assert_close(ppo.masked_mean(values, mask), ppo.masked_mean(values + junk, mask))
    torch.testing.assert_close(ppo.masked_var(values, mask), ppo.masked_var(values + junk, mask))
    la, _ = ppo.ppo_policy_loss(logprobs, old, adv_a, mask, 0.2)
    lb, _ = ppo.ppo_policy_loss(logprobs + junk, old - junk, adv_a + junk, mask, 0.2)
    torch.testing.assert_close(la, lb)
    va, _ = ppo.clipped_value_loss(values, values * 0.5, ret_a, mask, 0.2)
    vb, _ = ppo.clipped_value_loss(values + junk, values * 0.5 - junk, ret_a + junk, mask, 0.2)
    torch.testing.assert_close(va, vb)


def test_gae_handles_gaps_inside_the_mask() -> None:
    # a padding column in the middle of a row is skipped: the result equals the row with the gap removed
    rewards = torch.tensor([[0.1, 9.0, 0.3, 1.0]])
    values = torch.tensor([[0.4, -9.0, 0.2, 0.6]])
    mask = torch.tensor([[True, False, True, True]])
    adv, _ = ppo.gae(rewards, values, mask, 0.9, 0.8)
    exp, _ = naive_gae([0.1, 0.3, 1.0], [0.4, 0.2, 0.6], 0.9, 0.8)
    torch.testing.assert_close(adv[0, [0, 2, 3]], torch.tensor(exp))


def test_whitening_a_constant_gives_zeros_not_nan() -> None:
    out = ppo.masked_whiten(torch.full((2, 3), 4.0), torch.ones(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))


def test_whiten_gives_zero_mean_unit_variance_on_mask() -> None:
    x = torch.randn(3, 8) * 5 + 2
    mask = torch.rand(3, 8) > 0.3
    mask[0, :2] = True
    w = ppo.masked_whiten(x, mask)
    assert abs(float(ppo.masked_mean(w, mask))) < 1e-5
    assert float(ppo.masked_var(w, mask)) == pytest.approx(1.0, rel=1e-4)
    assert torch.all(w[~mask] == 0)


def test_policy_loss_clips_and_reports() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2)
    # ratio e^0.5 ~ 1.65 with positive advantage: clipped at 1.2, so no gradient flows through the first token
    logprobs = torch.tensor([[0.5, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0]])
    loss, stats = ppo.ppo_policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    assert float(loss.detach()) == pytest.approx(-(1.2 + 1.0) / 2)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    assert float(stats["approxkl"]) == pytest.approx(0.5 * 0.25 / 2)
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] == pytest.approx(-0.5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    lp = torch.randn(2, 5)
    adv = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, stats = ppo.ppo_policy_loss(lp, lp.clone(), adv, mask, 0.2)
    torch.testing.assert_close(loss, -adv.mean())
    assert float(stats["approxkl"]) == 0 and float(stats["clipfrac"]) == 0


def test_value_loss_clips() -> None:
    mask = torch.ones(1, 1, dtype=torch.bool)
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, stats = ppo.clipped_value_loss(values, torch.tensor([[0.0]]), torch.tensor([[2.0]]), mask, 0.2)
    # unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24: the larger (pessimistic) one counts
    assert float(loss.detach()) == pytest.approx(0.5 * 3.24)
    assert float(stats["clipfrac"]) == 1.0


def test_adaptive_kl_controller_moves_toward_target() -> None:
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=100)
    up = [ctl.update(12.0, n_steps=10) for _ in range(5)]
    assert all(b > a for a, b in zip([0.2, *up], up))  # KL above target: the penalty grows
    assert up[0] == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))  # error clipped at +20%
    down = [ctl.update(1.0, n_steps=10) for _ in range(5)]
    assert all(b < a for a, b in zip([up[-1], *down], down))
    at_target = ctl.update(6.0, n_steps=10)
    assert at_target == pytest.approx(down[-1])


def test_kl_controller_state_round_trip() -> None:
    ctl = ppo.AdaptiveKLController(0.3, target=4.0, horizon=50)
    ctl.update(10.0, 16)
    other = ppo.AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(ctl.state_dict())
    assert other.update(2.0, 16) == ctl.update(2.0, 16)
    fixed = ppo.FixedKLController(0.05)
    assert fixed.update(100.0, 16) == 0.05
    f2 = ppo.FixedKLController(1.0)
    f2.load_state_dict(fixed.state_dict())
    assert f2.value == 0.05


def test_masked_stats_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert float(ppo.masked_mean(x, mask)) == pytest.approx(2.5)
    assert float(ppo.masked_sum(x, mask)) == pytest.approx(10.0)
    torch.testing.assert_close(ppo.masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.5]))
    torch.testing.assert_close(ppo.masked_sum(x, mask, dim=1), torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(ppo.masked_mean(x, mask, dim=0), torch.tensor([2.0, 3.0, 0.0]))  # empty column: 0
    # {1, 2, 3, 4}: mean 2.5, squared deviations sum 5: unbiased 5/3, population 5/4
    assert float(ppo.masked_var(x, mask)) == pytest.approx(5 / 3)
    assert float(ppo.masked_var(x, mask, unbiased=False)) == pytest.approx(5 / 4)
    two = torch.tensor([[True, False, False], [True, False, False]])  # {1, 3}: the smallest unbiased case, 2
    assert float(ppo.masked_var(x, two)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        ppo.masked_var(x, torch.tensor([[True, False, False], [False, False, False]]))
    assert float(ppo.masked_var(x, torch.tensor([[True, False, False], [False, False, False]]), unbiased=False)) == 0
    w = ppo.masked_whiten(x, mask)
    s = (5 / 3 + 1e-8) ** -0.5
    torch.testing.assert_close(w, torch.tensor([[-1.5 * s, -0.5 * s, 0.0], [0.5 * s, 1.5 * s, 0.0]]))
    w2 = ppo.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w2, torch.tensor([[-1.5 * s + 2.5, -0.5 * s + 2.5, 0.0], [0.5 * s + 2.5, 1.5 * s + 2.5, 0.0]]))


def test_masked_mean_of_one_token_and_of_none() -> None:
    x = torch.tensor([[3.0, 5.0, 7.0], [2.0, 4.0, 6.0]])
    mask = torch.tensor([[0, 1, 0], [0, 0, 0]])
    assert ppo.masked_mean(x, mask, dim=1).tolist() == [5.0, 0.0]  # one token: its value; none: 0, not NaN
    assert ppo.masked_mean(x, mask).item() == 5.0
    assert ppo.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_last_token_index_and_shape_checks_by_hand() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0]])
    assert ppo.last_token_index(mask).tolist() == [1, 3, 2, 2]
    for labels_shape in ((2, 4), (2, 2), (3, 3)):  # longer, shorter, more rows: every mismatch is refused
        with pytest.raises(ValueError, match="disagree"):
            ppo.logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(labels_shape, dtype=torch.long))
    for n in (3, 1):  # more scores than rows, and fewer
        with pytest.raises(ValueError, match=rf"scores \({n},\) must be \(B,\) with B = 2$"):
            ppo.per_token_rewards(torch.ones(n), torch.zeros(2, 4), 0.1, torch.ones(2, 4, dtype=torch.bool))
    for values_shape, mask_shape in (((2, 2), (2, 3)), ((2, 3), (2, 4)), ((2, 3), (2, 2)), ((2, 4), (2, 4)), ((2, 2), (2, 2))):
        with pytest.raises(ValueError, match="must all be"):
            ppo.gae(torch.zeros(2, 3), torch.zeros(values_shape), torch.ones(mask_shape, dtype=torch.bool), 1.0, 1.0)
    # chunking: the last chunk may be shorter than chunk_size
    logits, labels = torch.randn(5, 2, 7), torch.randint(0, 7, (5, 2))
    torch.testing.assert_close(ppo.logprobs_from_logits(logits, labels, chunk_size=2), ppo.logprobs_from_logits(logits, labels))
    torch.testing.assert_close(ppo.logprobs_from_logits(logits, labels, chunk_size=5), ppo.logprobs_from_logits(logits, labels))
    assert ppo.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))


def test_policy_and_value_loss_by_hand_on_every_branch() -> None:
    mask = torch.tensor([[True, True, True, False]])
    old = torch.zeros(1, 4)
    lp = torch.tensor([[0.5, -0.5, 0.1, 7.0]])  # ratios e^0.5 = 1.65, e^-0.5 = 0.61, e^0.1 = 1.105; last is padding
    adv = torch.tensor([[-1.0, -2.0, 3.0, 5.0]])
    loss, st = ppo.ppo_policy_loss(lp, old, adv, mask, 0.2)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1)]
    # -A * ratio vs -A * clip(ratio): max of (1.65, 1.2) = 1.65; max(1.21, 1.6) = 1.6; max(-3.32, -3.32)
    want = (max(r[0], 1.2) + max(2 * r[1], 2 * 0.8) + -3 * r[2]) / 3
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(st["clipfrac"]) == pytest.approx(1 / 3)  # only the second token took the clipped branch
    assert float(st["ratio"]) == pytest.approx(sum(r) / 3, rel=1e-5)
    assert float(st["approxkl"]) == pytest.approx(0.5 * (0.25 + 0.25 + 0.01) / 3, rel=1e-5)
    values = torch.tensor([[1.0, 0.0, 0.5, 9.0]])
    old_v = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 0.4, 0.0]])
    vloss, vst = ppo.clipped_value_loss(values, old_v, ret, mask, 0.2)
    # token 1: (1-0)^2 = 1 vs (0.2-0)^2 = 0.04 -> 1; token 2: 1 vs 1 -> 1; token 3: 0.01 vs 0.04 -> 0.04 (clipped)
    assert float(vloss) == pytest.approx(0.5 * (1 + 1 + 0.04) / 3)
    assert float(vst["clipfrac"]) == pytest.approx(1 / 3)
    assert float(vst["vpred"]) == pytest.approx(0.5)
    # the clip range is around the OLD value: v 0.6 with v_old 0.5 moved 0.1 < 0.2, so nothing is clipped
    vloss, vst = ppo.clipped_value_loss(torch.tensor([[0.6]]), torch.tensor([[0.5]]), torch.tensor([[0.0]]),
                                        torch.ones(1, 1), 0.2)
    assert float(vloss) == pytest.approx(0.5 * 0.36) and float(vst["clipfrac"]) == 0.0


def test_adaptive_kl_controller_by_hand() -> None:
    ctl = ppo.AdaptiveKLController(0.5, target=2.0, horizon=10)
    assert ctl.update(2.2, n_steps=5) == pytest.approx(0.5 * (1 + 0.1 * 5 / 10))  # error 0.1, not clipped
    ctl = ppo.AdaptiveKLController(0.5, target=2.0, horizon=10)
    assert ctl.update(0.0, n_steps=5) == pytest.approx(0.5 * (1 - 0.2 * 5 / 10))  # error -1 clipped to -0.2
    with pytest.raises(ValueError, match="diverged"):
        ctl.update(float("nan"), 4)
    for target, horizon in ((0.0, 10), (-1.0, 10), (1.0, 0), (1.0, -5)):
        with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
            ppo.AdaptiveKLController(0.1, target=target, horizon=horizon)
    assert ppo.AdaptiveKLController(0.1, target=1e-3, horizon=1).state_dict() == {"value": 0.1, "target": 1e-3, "horizon": 1}

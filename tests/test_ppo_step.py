"""One PPO step of the trainer, recomputed by hand: the reward/loss code between the rollout and the optimizer.

``ppo_step`` runs on the tiny T5 with spies on its inputs (the rollout, the reference logprobs, the scores) and
on what it hands to ``ppo_update``; from those inputs this test recomputes, in float64 Python loops and without
models/ppo.py: the per-token KL-penalised rewards, GAE, the whitened advantages, the returns, the KL
controller's next coefficient and the logged KL; then the one SGD step of the update (one mini-batch, one
epoch, two micro-batches) from a loss written out here. It is the trainer half of the mutation run's test
command (tests/mutation/cosmic-ray.toml): seconds, and sensitive to every term.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from test_trainer import PROMPTS, WordScorer, fresh_policy, make_cfg

from detoxflow.models import trainer as T

GAMMA, LAM, COEF, TARGET, HORIZON, VF, ENT, LR = 0.9, 0.8, 0.3, 0.5, 40, 0.25, 0.05, 0.1
PENALTY, MIN_LEN = 0.1, 6  # the length guard: every response is at most 6 tokens (make_cfg), so it can fire


def naive_gae(rewards: list[float], values: list[float]) -> list[float]:
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + GAMMA * nxt - values[t] + GAMMA * LAM * last
        adv[t] = last
    return adv


def move_adapter(policy) -> None:
    """LoRA B set to seeded random values: policy and reference differ, so the KL terms are not 0."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def rewrite_rollouts(policy, edit) -> None:
    """The policy's rollouts with ``edit(ids, keep)`` applied in place to their response ids and mask, then
    re-scored by the policy itself, so the behaviour logprobs, values and entropy stay those of the tokens in the
    batch."""
    real_rollout = policy.rollout

    def rollout(query_ids, query_mask, gen, *a, **k):
        roll = real_rollout(query_ids, query_mask, gen, *a, **k)
        keep, ids = roll.response_mask.clone(), roll.response_ids.clone()
        edit(ids, keep)
        with torch.no_grad():
            lp, v, ent = policy.forward(query_ids, query_mask, ids, keep, with_entropy=True,
                                        temperature=gen.temperature, sampled_from=roll.sampled_from)
        return dataclasses.replace(roll, response_ids=ids, response_mask=keep, logprobs=lp, values=v, entropy=ent)

    policy.rollout = rollout


def cut_first_row(policy) -> None:
    """The policy's rollouts cut row 0 two tokens short (no EOS): every batch has padding, so every mask matters."""

    def edit(ids, keep) -> None:
        n0 = int(keep[0].sum())
        assert n0 >= 3, "row 0 of this seed's rollout is too short to cut"
        keep[0, n0 - 2 :], ids[0, n0 - 2 :] = 0, policy.pad_token_id

    rewrite_rollouts(policy, edit)


def edge_rows(policy) -> None:
    """The policy's rollouts end with edge cases of the length guard: row 0 is a lone EOS (one token, which is
    the EOS: no content), row 1 is cut two tokens short and its last token replaced by an id below the EOS id (no
    EOS at its end: every token is content), row 2 is two tokens of which the second is EOS (one token of content)."""
    eos = policy.eos_token_id
    assert eos > 0, "the test needs a token id below the EOS id"

    def edit(ids, keep) -> None:
        keep[0], ids[0] = 0, policy.pad_token_id
        keep[0, 0], ids[0, 0] = 1, eos
        n1 = int(keep[1].sum())
        assert n1 >= 3, "row 1 of this seed's rollout is too short to cut"
        keep[1, n1 - 2 :], ids[1, n1 - 2 :] = 0, policy.pad_token_id
        ids[1, n1 - 3] = eos - 1
        n2 = int(keep[2].sum())
        assert n2 >= 2, "row 2 of this seed's rollout is too short"
        keep[2, 2:], ids[2, 2:] = 0, policy.pad_token_id
        ids[2, 1] = eos

    rewrite_rollouts(policy, edit)


def test_one_step_by_hand(tiny_models, monkeypatch, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = make_cfg(tiny_models, "t5", f"ppo.gamma={GAMMA}", f"ppo.lam={LAM}", f"ppo.kl.init_coef={COEF}",
                   f"ppo.kl.target={TARGET}", f"ppo.kl.horizon={HORIZON}", f"ppo.vf_coef={VF}", f"ppo.ent_coef={ENT}",
                   "ppo.batch_size=4", "ppo.mini_batch_size=4", "ppo.gradient_accumulation_steps=2",
                   "ppo.ppo_epochs=1", "ppo.max_grad_norm=1e6", "generation.min_new_tokens=0", "lora.dropout=0.0",
                   f"ppo.length_penalty={PENALTY}", f"ppo.min_length={MIN_LEN}")
    policy = fresh_policy(cfg)
    move_adapter(policy)
    seen: dict = {}
    real_ref, real_update = policy.ref_logprobs, T.ppo_update

    def ref_spy(*a, **k):
        seen["ref"] = real_ref(*a, **k)
        return seen["ref"]

    def update_spy(cfg_, policy_, opt, step, q, qm, r, rm, old_lp, old_v, adv, ret, *rest, **kw):
        seen.update(q=q, qm=qm, r=r, rm=rm, old_lp=old_lp, old_v=old_v, adv=adv, ret=ret)
        seen["w0"] = [p.detach().clone() for p in policy_.trainable_parameters()]
        return real_update(cfg_, policy_, opt, step, q, qm, r, rm, old_lp, old_v, adv, ret, *rest, **kw)

    edge_rows(policy)
    monkeypatch.setattr(policy, "ref_logprobs", ref_spy)
    monkeypatch.setattr(T, "ppo_update", update_spy)
    scorer = WordScorer()
    scores_seen: list[torch.Tensor] = []
    real_score = scorer.score
    scorer.score = lambda texts: scores_seen.append(real_score(texts)) or scores_seen[-1]
    params = policy.trainable_parameters()
    opt = torch.optim.SGD(params, lr=LR)
    kl_ctl = T.make_kl_controller(cfg.ppo.kl)
    metrics = T.ppo_step(cfg, policy, scorer, PROMPTS, 1, opt, kl_ctl, None)

    rm, old_lp, old_v, ref = seen["rm"], seen["old_lp"].double(), seen["old_v"].double(), seen["ref"].double()
    scores = scores_seen[0].scores.double().tolist()
    adv_raw, ret_want, seq_kl, seq_k3, flat, short = [], [], [], [], [], 0
    for i in range(rm.shape[0]):
        n = int(rm[i].sum())
        k1 = [float(old_lp[i, t] - ref[i, t]) for t in range(n)]
        seq_k3.append(sum(math.exp(-k) - 1 + k for k in k1))  # (r - 1) - log r, r = ref / policy = exp(-k1)
        rewards = [-COEF * k for k in k1]
        # the length guard counts the response's tokens without a final EOS (a truncated row has none)
        content = n - int(int(seen["r"][i, n - 1]) == policy.eos_token_id)
        missing = max(0, MIN_LEN - content)
        short += missing > 0
        rewards[-1] += scores[i] - PENALTY * missing
        vals = [float(old_v[i, t]) for t in range(n)]
        a = naive_gae(rewards, vals)
        adv_raw.append(a)
        ret_want.append([x + v for x, v in zip(a, vals)])
        seq_kl.append(sum(k1))
        flat.extend(a)
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    for i, a in enumerate(adv_raw):
        n = len(a)
        want = torch.tensor([(x - mean) / (var + 1e-8) ** 0.5 for x in a], dtype=torch.float64)
        torch.testing.assert_close(seen["adv"][i, :n].double(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen["ret"][i, :n].double(), torch.tensor(ret_want[i], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
        assert torch.all(seen["adv"][i, n:] == 0) and torch.all(seen["ret"][i, n:] == 0)
    mean_kl = sum(seq_kl) / len(seq_kl)
    assert metrics["objective/kl"] == pytest.approx(mean_kl, abs=1e-5)
    assert metrics["objective/kl_coef"] == COEF
    assert metrics["objective/kl_k3"] == pytest.approx(sum(seq_k3) / len(seq_k3), abs=1e-5)
    assert metrics["env/length_penalty_rows"] == pytest.approx(short / rm.shape[0])
    err = min(max(mean_kl / TARGET - 1.0, -0.2), 0.2)
    assert kl_ctl.value == pytest.approx(COEF * (1 + err * 4 / HORIZON), rel=1e-6)
    assert metrics["objective/rlhf_reward"] == pytest.approx(sum(s - COEF * k for s, k in zip(scores, seq_kl)) / 4,
                                                              abs=1e-5)

    # the update: one SGD step on the mean over two micro-batches of the PPO loss, written out (ratio 1 and
    # values equal to the rollout's, so neither clip is active at the first and only step)
    w1 = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, seen["w0"]):
            p.copy_(w)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(T._mix(cfg.seed, 1, 0)))
    total = 0.0
    policy.set_train(True)
    for mc in order.split(2):
        lp, v, ent = policy.forward(seen["q"][mc], seen["qm"][mc], seen["r"][mc], rm[mc], with_entropy=True,
                                    temperature=cfg.generation.temperature)
        m = rm[mc].float()
        adv, ret = seen["adv"][mc], seen["ret"][mc]
        ratio = torch.exp(lp - seen["old_lp"][mc])
        pg = -(adv * ratio * m).sum() / m.sum()
        vf = 0.5 * ((v - ret).square() * m).sum() / m.sum()
        entropy = (ent * m).sum() / m.sum()
        total = total + (pg + VF * vf - ENT * entropy) / 2
    policy.set_train(False)
    grads = torch.autograd.grad(total, params)
    assert max(float(gr.abs().max()) for gr in grads) > 1e-4
    norm = math.sqrt(sum(float(gr.double().square().sum()) for gr in grads))  # what clip_grad_norm_ measured
    assert metrics["policy/grad_norm"] == pytest.approx(norm, rel=1e-4)
    for w0, gr, got in zip(seen["w0"], grads, w1, strict=True):
        torch.testing.assert_close(got, w0 - LR * gr, rtol=0.0, atol=1e-6)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["policy/updates"] == 1.0


def test_early_stop_reads_the_mean_approx_kl_of_a_mini_batch(tiny_models) -> None:
    """With gradient accumulation, the early-stop test compares the mini-batch's approx-KL - the mean over its
    micro-batches, computed here from the micro-batches' own figures - with ``ppo.target_approx_kl``: a target
    above that mean lets the step finish, one below it stops the step after that mini-batch. On the way: with
    EOS banned for the first token (``min_new_tokens`` 1), the first mini-batch's ratio is exactly 1 (the training
    forward scores under the rollout's filter), and ``objective/kl`` is the configured estimator (k3 here)."""
    torch.set_num_threads(1)

    def one_step(target: float | None) -> tuple[dict, list[float]]:
        cfg = make_cfg(tiny_models, "t5", "ppo.batch_size=4", "ppo.mini_batch_size=2",
                       "ppo.gradient_accumulation_steps=2", "ppo.ppo_epochs=1", "generation.min_new_tokens=1",
                       "ppo.kl.estimator=k3", "lora.dropout=0.0",
                       f"ppo.target_approx_kl={'null' if target is None else target}")
        policy = fresh_policy(cfg)
        move_adapter(policy)
        cut_first_row(policy)
        seen: list[float] = []
        real_loss = T.P.ppo_policy_loss

        def loss_spy(*a, **k):
            loss, pg = real_loss(*a, **k)
            seen.append(float(pg["approxkl"]))
            return loss, pg

        T.P.ppo_policy_loss = loss_spy
        try:
            opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)  # a big step: the second mini-batch moves
            metrics = T.ppo_step(cfg, policy, WordScorer(), PROMPTS, 1, opt, T.make_kl_controller(cfg.ppo.kl), None)
        finally:
            T.P.ppo_policy_loss = real_loss
        return metrics, seen

    free, micro = one_step(None)
    assert len(micro) == 4 and free["policy/updates"] == 2 and free["policy/early_stop"] == 0
    assert free["objective/kl"] == free["objective/kl_k3"] != free["objective/kl_k1"]
    assert all(math.isfinite(free[k]) for k in ("objective/kl_k1", "objective/kl_k3", "objective/rlhf_reward"))
    second = (micro[2] + micro[3]) / 2  # the second mini-batch's approx-KL (the first is 0: ratio 1)
    assert max(micro[:2]) < 1e-10 and second > 1e-6
    above, _ = one_step(1.5 * second)
    assert above["policy/early_stop"] == 0 and above["policy/updates"] == 2
    below, seen_below = one_step(0.75 * second)
    assert below["policy/early_stop"] == 1 and below["policy/updates"] == 2
    assert seen_below == pytest.approx(micro, rel=1e-6)  # the same step up to the stop: the same rollout


def test_a_non_finite_loss_stops_the_step_and_names_the_epoch(tiny_models, monkeypatch) -> None:
    torch.set_num_threads(1)
    cfg = make_cfg(tiny_models, "t5", "ppo.ppo_epochs=2")
    policy = fresh_policy(cfg)
    real_loss = T.P.ppo_policy_loss
    calls = {"n": 0}

    def nan_in_epoch_2(*a, **k):  # epoch 1 has batch_size / mini_batch_size = 2 mini-batches
        calls["n"] += 1
        loss, pg = real_loss(*a, **k)
        return (loss * float("nan") if calls["n"] > 2 else loss), pg

    monkeypatch.setattr(T.P, "ppo_policy_loss", nan_in_epoch_2)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.01)
    with pytest.raises(T.TrainingError, match=r"step 1: PPO loss \(epoch 2\) are not finite"):
        T.ppo_step(cfg, policy, WordScorer(), PROMPTS, 1, opt, T.make_kl_controller(cfg.ppo.kl), None)


def test_each_rank_steps_the_kl_controller_by_the_global_batch(tiny_models) -> None:
    """Rank 0 of two: the controller moves by ``batch_size x world_size`` samples a step (every rank sees the same
    mean KL and takes the same step). The other rank is stood in for by an identity all-reduce: a rank whose peer
    had the same numbers."""
    from detoxflow.models import distributed

    class SoloOfTwo(distributed.Dist):
        def barrier(self) -> None: ...
        def average_gradients_(self, params) -> None: ...
        def mean(self, value: float) -> float:
            return value

        def mean_metrics(self, metrics):
            return dict(metrics)

    torch.set_num_threads(1)
    cfg = make_cfg(tiny_models, "t5", f"ppo.kl.init_coef={COEF}", f"ppo.kl.target={TARGET}",
                   f"ppo.kl.horizon={HORIZON}", "ppo.batch_size=2", "ppo.mini_batch_size=2")
    policy = fresh_policy(cfg)
    kl_ctl = T.make_kl_controller(cfg.ppo.kl)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.01)
    metrics = T.ppo_step(cfg, policy, WordScorer(), PROMPTS, 1, opt, kl_ctl, None, dist=SoloOfTwo(rank=0, world_size=2))
    err = min(max(metrics["objective/kl"] / TARGET - 1.0, -0.2), 0.2)
    assert err != 0.0
    assert kl_ctl.value == pytest.approx(COEF * (1 + err * (2 * 2) / HORIZON), rel=1e-9)


def test_whitened_rewards_keep_their_mean(tiny_models, monkeypatch) -> None:
    """``ppo.whiten_rewards``: GAE gets the per-token rewards scaled to unit variance over the response tokens with
    their mean kept (``(r - m) / sqrt(var + 1e-8) + m``, unbiased variance), computed here in float64 loops."""
    torch.set_num_threads(1)
    cfg = make_cfg(tiny_models, "t5", "ppo.whiten_rewards=true", "ppo.mini_batch_size=4")
    policy = fresh_policy(cfg)
    seen: dict = {}
    real_rewards, real_gae = T.P.per_token_rewards, T.P.gae

    def rewards_spy(*a, **k):
        seen["raw"] = real_rewards(*a, **k)
        return seen["raw"]

    def gae_spy(rewards, values, mask, *a, **k):
        seen["gae_in"], seen["mask"] = rewards, mask
        return real_gae(rewards, values, mask, *a, **k)

    monkeypatch.setattr(T.P, "per_token_rewards", rewards_spy)
    monkeypatch.setattr(T.P, "gae", gae_spy)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.01)
    T.ppo_step(cfg, policy, WordScorer(), PROMPTS, 1, opt, T.make_kl_controller(cfg.ppo.kl), None)
    mask = seen["mask"].bool()
    flat = [float(x) for x in seen["raw"].double()[mask]]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    want = [(x - mean) / (var + 1e-8) ** 0.5 + mean for x in flat]
    assert abs(mean) > 1e-3  # a mean to keep
    torch.testing.assert_close(seen["gae_in"].double()[mask], torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert torch.all(seen["gae_in"][~mask] == 0)

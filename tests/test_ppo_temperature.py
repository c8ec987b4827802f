"""Temperature != 1: the rollout, the training forward and the reference score tokens under one distribution.

PPO's ratio and KL are only meaningful when all three passes divide the logits by the sampling temperature.
The expected logprobs are computed here without the code under test: one plain HF call per row on the unpadded
query (``policy.model`` with the adapter on, PEFT's ``disable_adapter()`` for the reference), logits divided by
the temperature, ``log_softmax``, gather. Sampling filters are off (``top_k=0``, ``top_p=1``,
``min_new_tokens=0``), so the distribution sampled from is ``softmax(logits / T)`` whatever the filter policy.

Mutants these tests fail on (each applied by hand, run, reverted):

- temperature ignored in the training forward (``policy.forward`` without ``logits / temperature``, or the
  trainer calling it without ``temperature=``): the policy-level test (expected logprobs differ by > 0.1) and
  the trainer-level test (``policy/ratio`` != 1 before any update);
- temperature ignored in the reference (``policy.ref_logprobs`` or the trainer's call to it): the policy-level
  test, and the trainer-level test (``objective/kl`` != 0 on a fresh adapter).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models.policy import Policy

ARCHS = ["t5", "gpt2"]
PROMPTS = [
    "the customer wants a refund",
    "person one asks the manager about the friday meeting report because the order arrived late",
    "thanks",
]
T = 0.5
GEN = GenerationConfig(max_new_tokens=8, min_new_tokens=0, do_sample=True, top_k=0, top_p=1.0, temperature=T)


def load(tiny_models: dict[str, Path], arch: str) -> Policy:
    torch.manual_seed(0)
    policy = Policy.load(ModelConfig(name_or_path=str(tiny_models[arch])), LoraSection(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a moved adapter (B != 0), so policy and reference differ
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return policy


def plain_logprobs(policy: Policy, q, qm, r, rm, temperature: float, adapter: bool) -> torch.Tensor:
    """``(B, Tr)`` logprobs of the response tokens, one unpadded HF call per row; 0 outside ``rm``."""
    out = torch.zeros(r.shape, dtype=torch.float64)
    model = policy.model
    model.eval()
    for i in range(r.shape[0]):
        query = q[i][qm[i].bool()].unsqueeze(0)
        n = int(rm[i].sum())
        resp = r[i, :n].unsqueeze(0)
        with torch.no_grad():
            if adapter:
                logits = _logits(policy, query, resp)
            else:
                with model.disable_adapter():
                    logits = _logits(policy, query, resp)
        lp = torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, resp[0].unsqueeze(-1)).squeeze(-1)
        out[i, :n] = lp
    return out


def _logits(policy: Policy, query: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """``(n, V)``: the logits that predict each of the ``n`` response tokens."""
    if policy.is_seq2seq:
        start = policy.model.get_base_model().config.decoder_start_token_id
        dec = torch.cat([torch.full_like(resp[:, :1], start), resp[:, :-1]], dim=1)
        return policy.model(input_ids=query, decoder_input_ids=dec).logits[0]
    ids = torch.cat([query, resp], dim=1)
    tq = query.shape[1]
    return policy.model(input_ids=ids).logits[0, tq - 1 : tq - 1 + resp.shape[1]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", ["fast", "hf"])
def test_rollout_forward_and_reference_use_the_sampling_temperature(tiny_models, arch: str, path: str) -> None:
    policy = load(tiny_models, arch)
    if path == "hf":
        policy.fast = None
    else:
        assert policy.fast is not None
    q, qm = policy.encode_queries(PROMPTS, 64)
    torch.manual_seed(3)
    roll = policy.rollout(q, qm, GEN)
    r, rm = roll.response_ids, roll.response_mask
    with torch.no_grad():
        lp, _, _ = policy.forward(q, qm, r, rm, temperature=T)
    ref = policy.ref_logprobs(q, qm, r, rm, temperature=T)

    want_pol = plain_logprobs(policy, q, qm, r, rm, T, adapter=True)
    want_ref = plain_logprobs(policy, q, qm, r, rm, T, adapter=False)
    at_one = plain_logprobs(policy, q, qm, r, rm, 1.0, adapter=True)
    # the temperature matters here (a pass that ignored it would be this far off), and so does the adapter
    assert (want_pol - at_one).abs().max() > 0.1
    assert (want_pol - want_ref).abs().max() > 1e-2
    tol = {"rtol": 0.0, "atol": 1e-5}
    torch.testing.assert_close(roll.logprobs.double(), want_pol, **tol)
    torch.testing.assert_close(lp.double(), want_pol, **tol)
    torch.testing.assert_close(ref.double(), want_ref, **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_scores_the_first_update_at_the_sampling_temperature(tiny_models, arch: str, tmp_path: Path) -> None:
    """One PPO step at T = 0.5 on a fresh adapter (policy == reference), one mini-batch, one epoch: the only
    update is computed on the rollout's own policy, so the PPO ratio is exactly 1 (approx-KL 0, nothing clipped),
    and the KL to the reference is 0. A pass scored at T = 1 instead gives |log ratio| ~ 0.5 and KL ~ 1 nat."""
    from test_trainer import PROMPTS as TRAIN_PROMPTS
    from test_trainer import WordScorer, fresh_policy, make_cfg

    from detoxflow.models.trainer import train

    cfg = make_cfg(tiny_models, arch, f"generation.temperature={T}", "generation.min_new_tokens=0",
                   "generation.max_new_tokens=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "lora.dropout=0.0")
    logged: list[dict] = []
    train(cfg, fresh_policy(cfg), WordScorer(), TRAIN_PROMPTS, tmp_path, lambda m, s: logged.append(m))
    m = logged[0]
    assert m["policy/updates"] == 1.0
    assert abs(m["policy/ratio"] - 1.0) < 1e-5
    assert m["policy/approxkl"] < 1e-10 and m["policy/clipfrac"] == 0.0
    assert abs(m["objective/kl"]) < 1e-4 and abs(m["objective/kl_k3"]) < 1e-6

"""What the golden tests of the fast path (tests/test_fastpath.py: GPT-2, T5; tests/test_fastpath_llama.py: the
Llama family) share: the prompts, the tolerance, a trained-size LoRA, the batch the trainer sees, running a call
on both paths of one policy, and the checks that read the same for every family.

Tolerance: float32 rounding of differently fused kernels (SDPA vs the HF attention, F.gelu vs GELU as separate
ops): 1e-5 absolute on logits / logprobs (values 1e-5 relative).
"""

from __future__ import annotations

import torch

from detoxflow.config import GenerationConfig
from detoxflow.models.policy import Policy, response_mask_from_eos

PROMPTS = [
    "the customer wants a refund",
    "person one asks the manager about the friday meeting report because the order arrived late",
    "thanks",
]
TOL = {"rtol": 1e-5, "atol": 1e-5}



def randomise_lora(policy: Policy, seed: int = 1) -> None:
    """Trained-size LoRA B (the update a fraction of the base weights) and a N(0, 1) value head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        policy.value_head.weight.copy_(torch.randn(policy.value_head.weight.shape, generator=g))


def batch(policy: Policy, tr: int = 9) -> tuple[torch.Tensor, ...]:
    """Queries of three lengths (left-padded causal, right-padded seq2seq) and fixed responses where row 0 ends
    early (EOS at 3), row 1 runs to the end and row 2 ends at 6: the shapes the trainer sees."""
    q, qm = policy.encode_queries(PROMPTS, 64)
    g = torch.Generator().manual_seed(5)
    eos = policy.eos_token_id
    r = torch.randint(3, len(policy.tokenizer), (len(PROMPTS), tr), generator=g)
    r[r == eos] = eos + 1 if eos + 1 < len(policy.tokenizer) else eos - 1
    r[0, 3] = eos
    r[2, 6] = eos
    r = r.to(policy.device)
    rm = response_mask_from_eos(r, eos)
    r = r.masked_fill(~rm, policy.pad_token_id)
    assert qm.sum(1).unique().numel() == 3 and not rm[0].all() and rm[1].all()
    return q, qm, r, rm


def both(policy: Policy, fn):
    """``fn()`` on the fast path, then on the HF path of the same policy."""
    fast = policy.fast
    assert fast is not None
    try:
        a = fn()
        policy.fast = None
        b = fn()
    finally:
        policy.fast = fast
    return a, b


def check_decoding_equals_full_forward(policy: Policy) -> None:
    """The decode loop (static K/V buffers, adapter on, not merged) fed fixed responses: every step's logits and
    hidden state equal the HF full forward's at the positions inside the response mask."""
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    with torch.no_grad():
        policy.fast, fast = None, policy.fast
        logits, hidden, _ = policy._run(q, qm, r, rm, want_hidden=True)
        policy.fast = fast
        step = policy._decode_steps(policy.model.get_base_model(), q, qm, r.shape[1])
        got_l, got_h = [], []
        lt, ht = next(step)
        for t in range(r.shape[1]):
            got_l.append(lt)
            got_h.append(ht)
            if t + 1 < r.shape[1]:
                lt, ht = step.send(r[:, t])
        step.close()
    torch.testing.assert_close(torch.stack(got_l, 1)[rm], logits[rm], **TOL)
    torch.testing.assert_close(torch.stack(got_h, 1)[rm], hidden[rm], **TOL)


def check_rollout_matches_hf(policy: Policy, max_new_tokens: int) -> None:
    """The whole rollout (sampling merge, inference mode) on both paths: same tokens from the same seed, statistics
    within rounding; the training forward scores the sampled tokens as the rollout did (its ``sampled_from``)."""
    randomise_lora(policy)
    q, qm = policy.encode_queries(PROMPTS, 64)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=2, do_sample=True, top_k=0, top_p=1.0)

    def run():
        torch.manual_seed(3)
        return policy.rollout(q, qm, gen)

    a, b = both(policy, run)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    for x, y in ((a.logprobs, b.logprobs), (a.values, b.values), (a.entropy, b.entropy)):
        torch.testing.assert_close(x, y, **TOL)
    with torch.no_grad():
        lp, _, _ = policy.forward(q, qm, a.response_ids, a.response_mask, sampled_from=a.sampled_from)
    torch.testing.assert_close(a.logprobs, lp, **TOL)

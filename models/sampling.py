"""The sampler: batched rollouts of a :class:`~detoxflow.models.policy.Policy` with the KV cache, the sampling
transforms (temperature, top-k, top-p, EOS banned before ``min_new_tokens``), the inverse-CDF draw, and the LoRA
merge used while sampling.

Shapes (docs/architecture.md): ``query_ids / query_mask (B, Tq)``, ``response_ids / response_mask (B, Tr)``,
``response_mask`` true on real response tokens up to and including the first EOS. Random numbers come from
torch's global generator only: one uniform per row per sampled token (:func:`categorical`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from detoxflow.config import GenerationConfig
from detoxflow.models.ppo import entropy_from_logits, logprobs_from_logits

if TYPE_CHECKING:
    from detoxflow.models.policy import Policy

# Merging the LoRA for sampling saves per-op overhead, which dominates only while the matrices are small (tiny
# models: rollout -5 to -17%); it costs a transient copy of the targeted weights, which grows with the model
# (small GPT-2: 85 MB) while the LoRA matmuls it saves shrink to ~3% of those layers' FLOPs. Merge only while the
# copy is at most this large.
MERGE_LORA_MAX_BYTES = 16 * 2**20


# Identifies the draw itself (how uniforms become tokens). It enters the evaluation settings digest: a change
# here gives other samples for the same seed, so numbers measured before are not comparable with new ones.
SAMPLER = "inverse-cdf-float64"


@dataclass
class SampledFrom:
    """The distribution each response token was drawn from, as a filter over the temperature-scaled logits:
    ``eos_token_id`` banned at positions ``t < min_new_tokens``, and, when top-k / top-p were active, ``keep
    (B, Tr, V)`` bool, the tokens the sampler's filter left at each position (None: the whole vocabulary).

    PPO scores every token under this same distribution in all three passes (rollout, training forward,
    adapter-off reference): see :func:`filter_logits`."""

    eos_token_id: int
    min_new_tokens: int
    keep: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> SampledFrom:
        """The filter of the rows ``index`` (a mini-batch)."""
        keep = None if self.keep is None else self.keep[index]
        return SampledFrom(self.eos_token_id, self.min_new_tokens, keep)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, T', V) -> (B, T', V)``, position t scoring response token t (T' <= Tr): see :func:`filter_logits`."""
        return filter_logits(logits, self.eos_token_id, self.min_new_tokens, self.keep)


@dataclass
class Rollout:
    """One batched sampling pass: ``response_ids``, ``response_mask (B, Tr)`` and, unless skipped, the behaviour
    policy's ``logprobs``, ``values``, ``entropy (B, Tr)`` of the sampled tokens (zero outside the mask), and
    ``sampled_from``, the filter that the training and reference passes apply to score the same distribution."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    sampled_from: SampledFrom | None = None


def filter_logits(
    logits: torch.Tensor, eos_token_id: int, min_new_tokens: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The sampler's filter on temperature-scaled ``logits (B, T', V) -> (B, T', V)`` (position t scores response
    token t): the EOS logit at ``t < min_new_tokens`` and every token outside ``keep (B, >=T', V)`` bool are set to
    the dtype's lowest finite value, so ``softmax`` gives them probability exactly 0 and the kept tokens the
    renormalised distribution the sampler drew from. Finite rather than -inf: entropy (``p * log p``) and its
    gradient stay finite."""
    low = torch.finfo(logits.dtype).min
    t = logits.shape[1]
    if keep is not None:
        logits = logits.masked_fill(~keep[:, :t], low)
    n_ban = min(min_new_tokens, t)
    if n_ban > 0:
        logits = logits.clone() if keep is None else logits
        logits[:, :n_ban, eos_token_id] = low
    return logits


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B, Tr) -> (B, Tr)`` bool: true up to and including the first EOS of each row (all true if none)."""
    is_eos = response_ids == eos_token_id
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return seen_before == 0


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row (either side): ``(B, T) -> (B, T')``."""
    keep = mask.bool().any(dim=0)
    if bool(keep.all()):
        return ids, mask
    return ids[:, keep], mask[:, keep]


def keep_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """The tokens top-k / top-p leave of ``logits (B, V) -> (B, V)`` bool (HF's order and tie rules), or None when
    neither is active (every token kept). Tokens already at -inf (banned) count as probability 0."""
    keep = None
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        keep = logits >= kth
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # keep at least the most likely token
        kept_p = ~drop_sorted.scatter(1, order, drop_sorted)
        keep = kept_p if keep is None else keep & kept_p
    return keep


def sample_token(
    logits: torch.Tensor, do_sample: bool, top_k: int = 0, top_p: float = 1.0, ban: int | None = None
) -> torch.Tensor:
    """Next tokens from temperature-scaled ``logits (B, V) -> (B,)``: a draw after the top-k / top-p filter
    (:func:`keep_mask`), or argmax when ``do_sample`` is false; token ``ban`` (EOS before min_new_tokens) is never
    chosen."""
    return _draw(logits, do_sample, top_k, top_p, ban)[0]


def _draw(
    logits: torch.Tensor, do_sample: bool, top_k: int, top_p: float, ban: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sample_token` that also returns the keep mask ``(B, V)`` it drew under (None: all kept)."""
    if ban is not None:
        logits = logits.clone()
        logits[:, ban] = -math.inf
    if not do_sample:
        return logits.argmax(dim=-1), None
    keep = keep_mask(logits, top_k, top_p)
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    return categorical(logits.softmax(dim=-1)), keep


def categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``probs (B, V) -> (B,)`` by inverse CDF: one uniform per row against the cumulative
    sum, both in float64. The same distribution as ``torch.multinomial(probs, 1)``, whose CPU kernel draws one
    exponential per vocabulary entry (0.8-0.9 ms for 16 x 2000, vs ~0.05 ms here: ~27 ms of a tiny model's
    32-token rollout), but a different random stream, so a seed gives other samples than before. In float32 the
    running sum stops growing for tokens below half a unit in the last place of the sum (6e-8 near 1): at
    50,257 tokens thousands of tokens could never be drawn; float64 moves that limit to 1e-16. A token with
    probability 0 (filtered, banned) is never drawn: it adds nothing to the CDF, and the one way to land on it -
    ``u`` rounding up to the total - falls back to the row's most likely token."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    ok = probs.gather(1, idx) > 0
    return torch.where(ok, idx, probs.argmax(dim=-1, keepdim=True)).squeeze(1)


def rollout(
    policy: Policy, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_cfg: GenerationConfig, with_stats: bool = True
) -> Rollout:
    """Sample responses (adapter on, eval mode, KV cache) and, from the same decoder passes, the behaviour
    policy's ``logprobs``, ``values`` and ``entropy`` of every sampled token: what ``policy.forward`` would return
    for these responses (equal up to float rounding), without a second forward.

    One ``model(...)`` call per token on the transformers model under the PEFT wrapper (LoRA layers stay in
    place), instead of HF ``generate``: its per-token machinery (logits processors, stopping criteria, input
    preparation) is 30% of its time at tiny sizes, and it cannot hand back the last hidden state the value
    head reads without returning every layer's. With the statistics, this loop takes about the time HF
    ``generate`` takes for the tokens alone (docs/benchmarks.md, section 4). Tokens after the first EOS are the pad id and masked out. Only
    the configured sampling transforms run (temperature, top-k, top-p; EOS banned before ``min_new_tokens``):
    no repetition penalty or n-gram blocking. The statistics are those of the distribution each token was drawn
    from (the filtered one), and ``Rollout.sampled_from`` carries that filter to the training and reference
    passes, so all three score the same distribution.
    """
    query_ids, query_mask = trim_padding(query_ids, query_mask)
    base = policy.model.get_base_model()
    b, n_new = query_ids.shape[0], gen_cfg.max_new_tokens
    eos, pad = policy.eos_token_id, policy.pad_token_id
    tokens: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    step_hidden: list[torch.Tensor] = []
    step_keep: list[torch.Tensor] = []
    was_training = policy.model.training
    policy.set_train(False)
    try:
        with torch.inference_mode(), lora_merged(policy):
            step = policy._decode_steps(base, query_ids, query_mask, n_new)
            logits, hidden = next(step)
            finished = torch.zeros(b, dtype=torch.bool, device=query_ids.device)
            for t in range(n_new):
                scaled = logits.float()
                if gen_cfg.temperature != 1.0:
                    scaled = scaled / gen_cfg.temperature
                token, keep = _draw(scaled, gen_cfg.do_sample, gen_cfg.top_k, gen_cfg.top_p,
                                    ban=eos if t < gen_cfg.min_new_tokens else None)
                token = token.masked_fill(finished, pad)
                tokens.append(token)
                if with_stats:  # the statistics are computed once after the loop: fewer small ops
                    step_logits.append(scaled)
                    step_hidden.append(hidden)
                    if keep is not None:
                        step_keep.append(keep)
                finished = finished | (token == eos)
                # one host sync per token, as in HF generate; none while EOS is still banned
                if t + 1 == n_new or (t + 1 >= gen_cfg.min_new_tokens and bool(finished.all())):
                    break
                logits, hidden = step.send(token)
            step.close()
    finally:
        policy.set_train(was_training)
    # stacked outside inference mode: inference tensors could not be saved for a later backward pass
    response = torch.stack(tokens, dim=1)
    mask = response_mask_from_eos(response, eos)
    response = response.masked_fill(~mask, pad)
    if not with_stats:
        return Rollout(response, mask)
    sampled_from = SampledFrom(eos, gen_cfg.min_new_tokens, torch.stack(step_keep, dim=1) if step_keep else None)
    with torch.no_grad():
        logits = sampled_from.apply(torch.stack(step_logits, dim=1))
        values = policy.value_head(torch.stack(step_hidden, dim=1).to(policy.value_head.weight.dtype)).squeeze(-1)
        m = mask.to(torch.float32)
        return Rollout(response, mask, logprobs_from_logits(logits, response) * m, values * m,
                       entropy_from_logits(logits) * m, sampled_from)


@contextmanager
def lora_merged(policy: Policy) -> Iterator[None]:
    """For sampling: the targeted base weights hold ``W + delta`` and the LoRA branches are off, which saves two
    small matmuls and PEFT's per-layer Python in every decoder call (5-17% of the rollout at tiny sizes).

    The merged weights are new tensors swapped in under the same parameters; afterwards the parameters hold
    their original tensors again, bit-identical (PEFT's unmerge subtracts the delta, which does not round-trip
    in floating point). Costs one transient copy of the targeted weights, so it is done only while that copy is
    at most :data:`MERGE_LORA_MAX_BYTES`; above it the LoRA branches run as usual. Only under no_grad."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in policy.model.modules() if isinstance(m, LoraLayer) and not m.merged]
    copy_bytes = sum(m.get_base_layer().weight.nbytes for m in layers)
    if copy_bytes > MERGE_LORA_MAX_BYTES:
        yield
        return
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for module in layers:
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            swapped.append((weight, weight.data))
            weight.data = weight.data + delta
        with policy.adapter_disabled():
            yield
    finally:
        for weight, original in swapped:
            weight.data = original

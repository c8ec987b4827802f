"""PPO math as pure functions over tensors: logprobs, KL estimators, per-token rewards, GAE, losses, KL control.

Conventions (docs/architecture.md): ``B`` = batch, ``T`` = response length, ``V`` = vocabulary.
``response_mask (B, T)`` is True (or 1) on real response tokens, up to and including the first EOS; every
function here ignores the other positions, whatever they hold. No config objects come in: plain numbers only.
This module imports torch and nothing else, so it can be tested and reused without a model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------- logprobs


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int | None = None) -> Tensor:
    """log p(labels) under ``softmax(logits)``: ``(B, T, V), (B, T) -> (B, T)``.

    Uses ``gather - logsumexp`` instead of ``log_softmax`` + gather: log_softmax materialises (and, under
    autograd, keeps) a second (B, T, V) tensor; logsumexp keeps only a (B, T) result. ``chunk_size`` rows at a
    time bounds the transient exp() buffer for large vocabularies.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    if chunk_size is None or chunk_size >= logits.shape[0]:
        return _logprobs(logits, labels)
    return torch.cat(
        [_logprobs(lg, lb) for lg, lb in zip(logits.split(chunk_size), labels.split(chunk_size))], dim=0
    )


def _logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    # float32 for the reduction: logsumexp over a bf16 vocabulary loses the small differences PPO ratios need
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy of ``softmax(logits)`` per position: ``(B, T, V) -> (B, T)``, in nats.

    ``H = logsumexp(l) - sum(softmax(l) * l)``, computed ``chunk_size`` rows at a time.
    """
    chunks = [logits] if chunk_size is None else list(logits.split(chunk_size))
    out = []
    for lg in chunks:
        lg = lg.float()
        lse = torch.logsumexp(lg, dim=-1)
        out.append(lse - (torch.softmax(lg, dim=-1) * lg).sum(-1))
    return torch.cat(out, dim=0)


# -------------------------------------------------------------------------------------------- KL estimators
# Per-token estimators of KL(pi || ref) from tokens sampled from pi (http://joschu.net/blog/kl-approx.html).
# Summed over the response they estimate the sequence KL; k1 is unbiased but can be negative per sample,
# k3 is unbiased and never negative, k2 is biased but low-variance.


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi - log ref: ``(B, T), (B, T) -> (B, T)``."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log pi - log ref)^2 / 2: ``(B, T), (B, T) -> (B, T)``."""
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = ref / pi: ``(B, T), (B, T) -> (B, T)``, always >= 0."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


# ------------------------------------------------------------------------------------------ masked stats


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true; ``dim=None`` reduces everything.

    ``x (B, T)``, ``mask (B, T)`` -> scalar, or ``(B,)`` / ``(T,)`` along ``dim``. Empty rows give 0.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the masked positions: ``(B, T) -> scalar`` or reduced along ``dim``."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions (all dims): ``(B, T) -> scalar``."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        if n < 2:
            raise ValueError(f"masked_var: unbiased variance needs at least 2 masked positions, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise ``x`` to unit variance (and zero mean if ``shift_mean``) over the masked positions.

    ``(B, T) -> (B, T)``; positions outside the mask are set to 0 so they cannot leak into later sums.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ------------------------------------------------------------------------------------------------ reward


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index of the last true position of each row: ``(B, T) -> (B,)`` (long). Works for either padding side.

    Raises ValueError naming the rows with no true position (their score would land nowhere).
    """
    mask = response_mask.bool()
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"response_mask rows {rows} have no real token; generate at least one new token")
    t = mask.shape[1]
    # argmax returns the first maximum, so look for the first true position from the right
    return (t - 1) - mask.flip(dims=[1]).to(torch.int8).argmax(dim=1)


def per_token_rewards(scores: Tensor, kl: Tensor, kl_coef: float, response_mask: Tensor) -> Tensor:
    """KL-penalised per-token reward: ``-kl_coef * kl`` on every response token, plus the sequence score on the
    last real token of each row.

    ``scores (B,)``, ``kl (B, T)``, ``response_mask (B, T)`` -> ``rewards (B, T)``, zero outside the mask.
    """
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B = {kl.shape[0]}")
    mask = response_mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = last_token_index(response_mask)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last] += scores.to(kl.dtype)
    return rewards


# --------------------------------------------------------------------------------------------------- GAE


def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens.

    ``rewards (B, T)``, ``values (B, T)``, ``response_mask (B, T)`` -> ``advantages (B, T)``, ``returns (B, T)``.
    Positions outside the mask are skipped entirely: the "next" value of a real token is the value of the next
    real token of that row (0 after the last), so padding anywhere - even with garbage values - changes nothing.
    Outputs are 0 outside the mask.
    """
    if not (rewards.shape == values.shape == response_mask.shape):
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must all be (B, T)"
        )
    mask = response_mask.bool()
    b, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_gae = rewards.new_zeros(b)
    next_value = rewards.new_zeros(b)
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        g = delta + gamma * lam * last_gae
        last_gae = torch.where(m, g, last_gae)
        next_value = torch.where(m, values[:, i], next_value)
        advantages[:, i] = torch.where(m, g, torch.zeros_like(g))
    returns = (advantages + values) * mask.to(values.dtype)
    return advantages, returns


# ------------------------------------------------------------------------------------------------ losses


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate, averaged over response tokens.

    ``logprobs (B, T)`` (with grad), ``old_logprobs (B, T)``, ``advantages (B, T)``, ``response_mask (B, T)`` ->
    ``(loss (), stats)`` with detached scalars ``approxkl`` (0.5 * E[(log ratio)^2]), ``clipfrac`` (share of tokens
    where the clipped branch was taken) and ``ratio`` (mean probability ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio.square(), response_mask),
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), response_mask),
            "ratio": masked_mean(ratio, response_mask),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)`` averaged over response tokens.

    ``values (B, T)`` (with grad), ``old_values (B, T)``, ``returns (B, T)``, ``response_mask (B, T)`` ->
    ``(loss (), stats)`` with detached ``clipfrac`` and ``vpred`` (mean predicted value).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns).square()
    loss_clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), response_mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).to(values.dtype), response_mask),
            "vpred": masked_mean(values, response_mask),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, init_coef: float) -> None:
        self.value = float(init_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of the KL coefficient (Ziegler et al. 2019, section 2.2).

    ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon``: above target the penalty grows, below
    it shrinks, at most 20% per ``horizon`` samples, so a noisy batch cannot swing it.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """``current_kl``: mean sequence KL of the batch just used; ``n_steps``: samples in it. Returns the new coef."""
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: KL is {current_kl}; the policy or reference diverged")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])

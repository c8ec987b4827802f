"""PEFT-PPO training loop: rollout -> score -> KL-penalised rewards -> GAE -> PPO epochs -> KL control.

:func:`train` reads top to bottom in the order of the algorithm, one PPO step being the numbered steps of
:func:`ppo_step` (1. sample prompts, 2. generate, 3. score, 4. reference logprobs, 5. per-token KL, 6. rewards,
7. GAE advantages, 8. PPO epochs, 9. KL control, 10. metrics); the math lives in :mod:`detoxflow.models.ppo`,
the model in :mod:`detoxflow.models.policy`. The trainer never imports a tracker: it calls
``log(metrics, step)`` once per step. Checkpoints (adapter, value head, optimizer, scheduler, KL controller, RNG
states, history) are written atomically to ``out_dir/checkpoints/step-<n>`` (:mod:`detoxflow.models.checkpoint`)
and a later call resumes from the newest one and reaches the same weights an uninterrupted run would.

Units of the logged metrics: ``objective/kl`` (the configured ``ppo.kl.estimator``: the KL in the reward, the
controller's input, the gate's ``train/kl_mean``), ``objective/kl_k1`` and ``objective/kl_k3`` are nats per
sequence (summed over the response, batch mean), the unit of ``ppo.kl.target``; ``objective/entropy`` is nats per token; lengths are tokens.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from detoxflow.config import Config, KLConfig
from detoxflow.faults import fault_point
from detoxflow.models import distributed, monitors
from detoxflow.models import ppo as P
from detoxflow.models.checkpoint import (
    TrainingError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    run_fingerprint,
    save_checkpoint,
)
from detoxflow.models.policy import Policy
from detoxflow.models.prompts import template_tail
from detoxflow.models.reward import Scorer, guarded_scores, scorer_input
from detoxflow.models.sampling import SampledFrom

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
# TrainingError (raised here and by the checkpoints) is defined in models/checkpoint.py; import it from either

@dataclass
class TrainResult:
    steps: int
    artifact_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    # multi-process runs only: world_size and each rank's weights digest before and after training
    distributed: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------- loop


def train(
    cfg: Config,
    policy: Policy,
    scorer: Scorer,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    log: LogFn,
    resume: bool = True,
) -> TrainResult:
    """Run ``cfg.ppo.steps`` PPO steps on ``prompts`` (templated queries); save the model to ``out_dir/model``.

    Under a multi-process launch (:mod:`detoxflow.models.distributed`) every rank calls this with the same
    arguments: each trains on its own ``ppo.batch_size`` shard of a global batch of ``batch_size * world_size``
    prompts, gradients are averaged, and only rank 0 calls ``log`` and writes checkpoints and the model."""
    pc = cfg.ppo
    dist = distributed.current()
    if pc.backend != "ppo":
        raise TrainingError(f"ppo.backend = '{pc.backend}': this trainer implements 'ppo'; set ppo.backend=ppo")
    if not prompts:
        raise TrainingError("train: no prompts; check data.train_split and data.max_train_samples")
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    params = policy.trainable_parameters()
    optimizer = make_optimizer(params, pc.learning_rate, policy.device)
    scheduler = _make_scheduler(optimizer, pc.lr_schedule, pc.warmup_steps, pc.steps)
    kl_ctl = make_kl_controller(pc.kl)
    fingerprint = run_fingerprint(cfg, prompts, world_size=dist.world_size)
    history: list[dict[str, float]] = []
    start = 0
    latest = latest_checkpoint(ckpt_root) if resume else None
    if not resume and ckpt_root.exists() and dist.is_main:
        logger.warning("resume=False: removing the old checkpoints in %s", ckpt_root)
        shutil.rmtree(ckpt_root)
    if latest is not None:
        start, history = load_checkpoint(latest, policy, optimizer, scheduler, kl_ctl, fingerprint, rank=dist.rank)
        logger.info("resuming from %s (step %d of %d)", latest, start, pc.steps)
    else:
        # ranks sample different responses (seed + rank); rank 0 draws what a single process would
        _seed_everything(cfg.seed + dist.rank)
    # DDP's start: one set of weights everywhere (a fresh LoRA init draws from each rank's RNG)
    dist.broadcast_(params)
    digest_start = distributed.params_digest(params) if dist.enabled else None

    bar = tqdm(total=pc.steps, initial=min(start, pc.steps), desc="ppo", unit="step", disable=not dist.is_main)
    for step in range(start + 1, pc.steps + 1):
        metrics = ppo_step(cfg, policy, scorer, prompts, step, optimizer, kl_ctl, latest, dist=dist)
        scheduler.step()
        history.append(metrics)
        if dist.is_main:
            log(metrics, step)
        fault_point("step", step)  # DETOXFLOW_FAULT=after:step:<n>: killed once step n is logged
        if step % pc.checkpoint_every == 0 or step == pc.steps:
            # every rank's RNG state goes into rank 0's checkpoint, so a resumed rank goes on sampling its own way
            rng_states = dist.gather_object(rng_state()) if dist.enabled else None
            if dist.is_main:
                latest = save_checkpoint(ckpt_root, step, policy, optimizer, scheduler, kl_ctl, history, fingerprint,
                                         pc.keep_checkpoints, rng_states=rng_states)
            dist.barrier()
            latest = latest_checkpoint(ckpt_root) if dist.enabled else latest
            fault_point("checkpoint", step)  # DETOXFLOW_FAULT=after:checkpoint:<n>: killed once step-n is on disk
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}",
                        tox=f"{metrics['objective/toxicity']:.3f}")
        bar.update()
    bar.close()

    extra = {"config": cfg.model_dump(mode="json"), "metrics": history[-1] if history else {},
             "train": {"steps": pc.steps, "kl_coef": kl_ctl.value}}
    artifact = out / "model"
    if dist.is_main:
        policy.save_artifact(artifact, extra=extra)
    report = _check_ranks_agree(dist, params, digest_start) if dist.enabled else None
    dist.barrier()  # no rank returns before the model is on disk
    return TrainResult(steps=pc.steps, artifact_dir=artifact, history=history, checkpoint_dir=latest,
                       distributed=report)


def _check_ranks_agree(dist: distributed.Dist, params: list[torch.nn.Parameter], digest_start: str | None) -> dict[str, Any]:
    """Gather every rank's weights digest (before and after training); raise if the ranks drifted apart."""
    ends = dist.gather_object(distributed.params_digest(params))
    starts = dist.gather_object(digest_start)
    if len(set(ends)) != 1:
        raise TrainingError(
            f"after training the ranks hold different weights (digests {ends}), so their gradients were not "
            "averaged and the saved model is rank 0's alone. Train with one process (orchestration.train_processes=1) "
            "and report this"
        )
    return {"world_size": dist.world_size, "params_digest_start": starts, "params_digest_end": ends}


def ppo_step(
    cfg: Config,
    policy: Policy,
    scorer: Scorer,
    prompts: Sequence[str],
    step: int,
    optimizer: torch.optim.Optimizer,
    kl_ctl: P.AdaptiveKLController | P.FixedKLController,
    last_checkpoint: Path | None,
    dist: distributed.Dist = distributed.SINGLE,
) -> dict[str, float]:
    """One PPO step (1-based ``step``); returns its metrics (means over the ranks when ``dist`` has several).
    Raises TrainingError on non-finite numbers."""
    pc, gen = cfg.ppo, cfg.generation
    t0 = time.perf_counter()
    where = f"step {step}"
    fix = (f"the last good checkpoint is {last_checkpoint}; a rerun resumes from it" if last_checkpoint
           else "no checkpoint was written yet, so a rerun starts over")

    # 1. sample a batch of prompts (a seeded pass over the prompts, without replacement within an epoch)
    # (several processes: this rank's shard of a global batch of batch_size * world_size prompts)
    idx = distributed.shard(batch_indices(len(prompts), pc.batch_size * dist.world_size, step, cfg.seed),
                            dist.rank, dist.world_size)
    batch_prompts = [prompts[i] for i in idx]
    query_ids, query_mask = policy.encode_queries(batch_prompts, cfg.data.max_query_tokens,
                                                  template_tail(cfg.data.prompt_template))

    # 2. generate responses with the current policy (adapter on, KV cache, no grad); the same decoder passes give
    #    the old logprobs, values and entropy of the sampled tokens, so no second no-grad forward is needed
    policy.set_train(False)
    roll = policy.rollout(query_ids, query_mask, gen)
    response_ids, response_mask = roll.response_ids, roll.response_mask
    old_logprobs, old_values, entropy = roll.logprobs, roll.values, roll.entropy
    texts = policy.decode(response_ids, response_mask)
    t_gen = time.perf_counter()

    # 3. score the responses (the summary alone, or query + summary, per reward.input)
    result = scorer.score(scorer_input(batch_prompts, texts, cfg.reward.input))
    scores = result.scores.to(policy.device, torch.float32)
    _check_finite(scores, f"{where}: scores from scorer '{getattr(scorer, 'name', scorer)}'", fix, texts)

    # 4. reference logprobs (one forward, adapter off); old logprobs + values came with the rollout
    #    scored, like the rollout's, under the distribution the tokens were drawn from (roll.sampled_from)
    ref_logprobs = policy.ref_logprobs(query_ids, query_mask, response_ids, response_mask, temperature=gen.temperature,
                                       sampled_from=roll.sampled_from)
    _check_finite(old_logprobs, f"{where}: policy logprobs", fix)
    _check_finite(ref_logprobs, f"{where}: reference logprobs", fix)
    _check_finite(old_values, f"{where}: values", fix)
    mask = response_mask
    t_fwd = time.perf_counter()

    # 5. per-token KL between policy and reference on the sampled tokens
    kl_k1 = P.kl_k1(old_logprobs, ref_logprobs) * mask
    kl_k3 = P.kl_k3(old_logprobs, ref_logprobs) * mask
    kl = kl_k1 if pc.kl.estimator == "k1" else kl_k3

    # 6. per-token rewards: -kl_coef * kl everywhere, the score (clipped to ±score_clip, minus the length guard)
    #    on the last real token
    kl_coef = kl_ctl.value
    lengths = mask.sum(dim=1)
    ends_with_eos = response_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1) == policy.eos_token_id
    scores, missing, reward_scores = guarded_scores(scores, lengths - ends_with_eos.long(), pc.score_clip,
                                                    pc.length_penalty, pc.min_length)
    rewards = P.per_token_rewards(reward_scores, kl, kl_coef, mask)
    if pc.whiten_rewards:
        rewards = P.masked_whiten(rewards, mask, shift_mean=False)

    # 7. advantages by GAE over the response tokens, whitened over the batch
    advantages, returns = P.gae(rewards, old_values, mask, pc.gamma, pc.lam)
    advantages = P.masked_whiten(advantages, mask)

    # 8. PPO epochs over shuffled mini-batches, gradient accumulation, clipping; stop early if approx-KL runs away
    update = ppo_update(cfg, policy, optimizer, step, query_ids, query_mask, response_ids, mask,
                        old_logprobs, old_values, advantages, returns, where, fix, dist=dist,
                        sampled_from=roll.sampled_from)
    t_upd = time.perf_counter()

    # 9. adapt the KL coefficient to the KL this batch actually had (nats per sequence, the configured
    #    estimator: the figure the reward penalises, the controller steers, the logs show and the gate reads)
    seq_kl = P.masked_sum(kl, mask, dim=1)
    mean_kl = dist.mean(float(seq_kl.mean()))  # every rank's controller must see the same KL
    kl_ctl.update(mean_kl, pc.batch_size * dist.world_size)

    # 10. metrics: objective, policy, losses, value, reward-hacking monitors
    stats = monitors.response_stats(texts, mask, ref_logprobs)
    metrics = {
        "objective/kl": float(seq_kl.mean()),  # this rank's; dist.mean_metrics makes it mean_kl
        "objective/kl_k1": float(P.masked_sum(kl_k1, mask, dim=1).mean()),
        "objective/kl_k3": float(P.masked_sum(kl_k3, mask, dim=1).mean()),
        "objective/entropy": float(P.masked_mean(entropy, mask)),
        "objective/scores": float(scores.mean()),
        "objective/scores_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "objective/toxicity": float(result.toxicity.float().mean()),
        "objective/rlhf_reward": float((scores - kl_coef * seq_kl).mean()),
        "objective/kl_coef": kl_coef,
        **update,
        "val/returns": float(P.masked_mean(returns, mask)),
        "env/response_length": float(lengths.float().mean()),
        **{f"env/{k}": float(v) for k, v in stats.items()},
        "env/length_penalty_rows": float((missing > 0).float().mean()),
        "policy/lr": optimizer.param_groups[0]["lr"],
        "time/generate_s": t_gen - t0,
        "time/forward_s": t_fwd - t_gen,
        "time/update_s": t_upd - t_fwd,
        "time/step_s": time.perf_counter() - t0,
    }
    return dist.mean_metrics(metrics)


def ppo_update(
    cfg: Config,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    step: int,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    where: str,
    fix: str,
    dist: distributed.Dist = distributed.SINGLE,
    sampled_from: SampledFrom | None = None,
) -> dict[str, float]:
    """``ppo_epochs`` passes over the batch ``(B, ...)`` in shuffled mini-batches; one optimizer step per
    mini-batch, accumulated over ``gradient_accumulation_steps`` micro-batches. Returns mean statistics.
    ``sampled_from``: the rollout's sampling filter, so the new logprobs score the distribution the old ones did."""
    pc = cfg.ppo
    b = response_ids.shape[0]
    micro = pc.mini_batch_size // pc.gradient_accumulation_steps
    params = policy.trainable_parameters()
    sums: dict[str, float] = {}
    n_micro, n_updates, early_stop = 0, 0, False
    policy.set_train(True)
    try:
        for epoch in range(pc.ppo_epochs):
            # a generator of its own: mini-batch order must not depend on how much sampling happened before
            g = torch.Generator().manual_seed(_mix(cfg.seed, step, epoch))
            order = torch.randperm(b, generator=g).to(response_ids.device)
            for mb_start in range(0, b, pc.mini_batch_size):
                mb = order[mb_start : mb_start + pc.mini_batch_size]
                optimizer.zero_grad(set_to_none=True)
                mb_kl = 0.0
                for mc in mb.split(micro):
                    logprobs, values, entropy = policy.forward(
                        query_ids[mc], query_mask[mc], response_ids[mc], response_mask[mc],
                        with_entropy=pc.ent_coef > 0, temperature=cfg.generation.temperature,
                        sampled_from=None if sampled_from is None else sampled_from.rows(mc),
                    )
                    m = response_mask[mc]
                    pg_loss, pg = P.ppo_policy_loss(logprobs, old_logprobs[mc], advantages[mc], m, pc.cliprange)
                    vf_loss, vf = P.clipped_value_loss(values, old_values[mc], returns[mc], m, pc.cliprange_value)
                    loss = pg_loss + pc.vf_coef * vf_loss
                    if entropy is not None:
                        loss = loss - pc.ent_coef * P.masked_mean(entropy, m)
                    _check_finite(loss.detach(), f"{where}: PPO loss (epoch {epoch + 1})", fix)
                    (loss / pc.gradient_accumulation_steps).backward()
                    for k, v in (("policy/approxkl", pg["approxkl"]), ("policy/clipfrac", pg["clipfrac"]),
                                 ("policy/ratio", pg["ratio"]), ("loss/policy", pg_loss), ("loss/value", vf_loss),
                                 ("loss/total", loss), ("val/vpred", vf["vpred"]), ("val/clipfrac", vf["clipfrac"])):
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    mb_kl += float(pg["approxkl"]) / pc.gradient_accumulation_steps
                    n_micro += 1
                dist.average_gradients_(params)  # DDP's all-reduce: the same step on every rank
                mb_kl = dist.mean(mb_kl)  # and the same early-stop decision
                grad_norm = torch.nn.utils.clip_grad_norm_(params, pc.max_grad_norm)
                sums["policy/grad_norm"] = sums.get("policy/grad_norm", 0.0) + float(grad_norm)
                optimizer.step()
                n_updates += 1
                if pc.target_approx_kl is not None and mb_kl > pc.target_approx_kl:
                    logger.warning("%s: approx-KL %.3f > %.3f, stopping this step's PPO epochs early",
                                 where, mb_kl, pc.target_approx_kl)
                    early_stop = True
                    break
            if early_stop:
                break
    finally:
        optimizer.zero_grad(set_to_none=True)
        policy.set_train(False)
    stats = {k: v / (n_updates if k == "policy/grad_norm" else n_micro) for k, v in sums.items()}
    stats["policy/updates"] = float(n_updates)
    stats["policy/early_stop"] = float(early_stop)
    return stats


# ------------------------------------------------------------------------------------------------ helpers


def make_kl_controller(kl: KLConfig) -> P.AdaptiveKLController | P.FixedKLController:
    if kl.mode == "adaptive":
        return P.AdaptiveKLController(kl.init_coef, kl.target, kl.horizon)
    return P.FixedKLController(kl.init_coef)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices of 1-based ``step``: consecutive slices of a stream of seeded per-epoch permutations, so
    every prompt is seen once per epoch and the batch depends only on (n, batch_size, step, seed)."""
    out: list[int] = []
    pos = (step - 1) * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (plain sums would make (seed 1, step 2) equal (seed 2, step 1))."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _check_finite(x: torch.Tensor, what: str, fix: str, texts: Sequence[str] | None = None) -> None:
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if x.dim() else [0]
    example = f"; first bad response: {texts[rows[0]]!r}" if texts else ""
    raise TrainingError(
        f"{what} are not finite (NaN/inf in rows {rows[:8]}){example}. Training stopped; {fix}. "
        f"Check the reward model, or lower ppo.learning_rate / ppo.max_grad_norm if the policy diverged."
    )


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable (adapter + value head) parameters, without weight decay. The fused kernel on CPU
    and CUDA: on CPU it takes 0.3 ms a step against the per-parameter loop's 1.4 ms for a T5 adapter's 26
    tensors (2 threads), and a PPO step makes one optimizer step per mini-batch."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda") or None)


def _make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):  # -> LRScheduler
    """One scheduler step per PPO step: warmup then constant, linear decay to 0, or cosine to 0."""

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (i - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))

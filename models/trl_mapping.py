"""How our config, reward and metrics map onto TRL 1.x RLOO / GRPO and back (used by
:mod:`detoxflow.models.trl_backends`, which runs the training):

- ``ppo.batch_size`` completions per step (``batch_size / num_generations`` prompts) -> ``generation_batch_size``;
  ``mini_batch_size / gradient_accumulation_steps`` -> ``per_device_train_batch_size``;
  ``ppo_epochs`` -> ``num_iterations``; so one step makes ``batch_size / mini_batch_size * ppo_epochs`` optimizer
  steps and ``max_steps`` is that times ``ppo.steps`` (see :func:`plan_steps`).
- ``ppo.kl.init_coef`` -> ``beta`` (fixed: TRL has no adaptive KL controller); ``cliprange`` -> ``epsilon``;
  ``ent_coef`` -> GRPO's ``entropy_coef``; RLOO advantages are normalised like our PPO whitens them.

The reward function wraps our :class:`~detoxflow.models.reward.Scorer` (scores: higher = less toxic), applies
``ppo.score_clip`` and the length guard of our trainer, and logs toxicity and the reward-hacking monitors.
TRL's logs are forwarded to ``log(metrics, step)`` under our metric keys (``objective/*``, ``env/*``,
``policy/*``, ``loss/*``); everything else TRL reports goes under ``trl/*``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detoxflow.config import Config, ConfigError, PPOConfig
from detoxflow.models import monitors
from detoxflow.models.reward import Scorer, guarded_scores, scorer_input
from detoxflow.models.trainer import TrainingError

logger = logging.getLogger("detoxflow.models.trl_backends")  # the name users saw before the split

LogFn = Callable[[dict[str, float], int], None]
BACKENDS: tuple[str, ...] = ("rloo", "grpo")

# TRL log keys -> ours where the meaning is the same (per-token KL is converted separately, see map_trl_logs)
_DIRECT_KEYS: dict[str, str] = {
    "entropy": "objective/entropy",
    "completions/mean_length": "env/response_length",
    "loss": "loss/total",
    "grad_norm": "policy/grad_norm",
    "learning_rate": "policy/lr",
    "clip_ratio/region_mean": "policy/clipfrac",
}


# ------------------------------------------------------------------------------------------------- checks


def check_supported(backend: str, is_seq2seq: bool) -> None:
    """Raise :class:`ConfigError` unless ``backend`` is a TRL backend and the policy is a causal LM."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"ppo.backend = {backend!r}: train_trl runs {', '.join(BACKENDS)}; use models.trainer.train for 'ppo'"
        )
    if is_seq2seq:
        raise ConfigError(
            f"ppo.backend {backend!r} supports causal LMs only (TRL 1.x); use ppo.backend=ppo for seq2seq models"
        )


# ------------------------------------------------------------------------------------------------- step plan


@dataclass(frozen=True)
class StepPlan:
    """How one of our rollout steps maps onto TRL's optimizer steps.

    Attributes:
        micro_batch: completions per forward/backward (``per_device_train_batch_size``).
        steps_per_generation: micro-batches one generation batch is split into.
        num_iterations: passes over each generation batch (our ``ppo_epochs``).
        optimizer_steps_per_rollout: TRL ``global_step`` increments per rollout step.
        max_steps: TRL ``max_steps`` for ``ppo.steps`` rollout steps.
        save_steps: TRL ``save_steps`` for a checkpoint every ``ppo.checkpoint_every`` rollout steps.
        warmup_steps: TRL ``warmup_steps`` for ``ppo.warmup_steps`` rollout steps.
    """

    micro_batch: int
    steps_per_generation: int
    num_iterations: int
    optimizer_steps_per_rollout: int
    max_steps: int
    save_steps: int
    warmup_steps: int


def plan_steps(ppo: PPOConfig) -> StepPlan:
    """Translate ``ppo.*`` (rollout steps, batch, mini-batch, accumulation, epochs) into TRL's step counts."""
    micro = ppo.mini_batch_size // ppo.gradient_accumulation_steps
    per_rollout = ppo.batch_size // ppo.mini_batch_size * ppo.ppo_epochs
    return StepPlan(
        micro_batch=micro,
        steps_per_generation=ppo.batch_size // micro,
        num_iterations=ppo.ppo_epochs,
        optimizer_steps_per_rollout=per_rollout,
        max_steps=ppo.steps * per_rollout,
        save_steps=ppo.checkpoint_every * per_rollout,
        warmup_steps=ppo.warmup_steps * per_rollout,
    )


# ------------------------------------------------------------------------------------------------- reward


class ScorerReward:
    """A TRL reward function over our :class:`Scorer`: ``(prompts, completions, completion_ids) -> list[float]``.

    The reward is ``scores`` (higher = less toxic, already times ``reward.scale``), clipped to
    ``±ppo.score_clip`` when set, minus ``ppo.length_penalty`` per token missing below
    ``ppo.min_length`` (the same guard as our PPO trainer). Through TRL's ``log_metric`` it reports the
    batch's scores and toxicity and the reward-hacking monitors, which TRL averages per logging step.
    """

    # TRL names the reward in its logs ("rewards/<__name__>/mean") after this attribute
    __name__ = "scorer"

    def __init__(self, scorer: Scorer, cfg: Config, eos_token_ids: Sequence[int]) -> None:
        self.scorer = scorer
        self.reward_input = cfg.reward.input
        self.score_clip = cfg.ppo.score_clip
        self.length_penalty = cfg.ppo.length_penalty
        self.min_length = cfg.ppo.min_length
        self.eos_token_ids = set(int(i) for i in eos_token_ids)

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **_: Any,
    ) -> list[float]:
        texts = [c.strip() for c in completions]
        result = self.scorer.score(scorer_input(list(prompts), texts, self.reward_input))
        content = None
        if completion_ids is not None:
            content = torch.tensor([sum(1 for t in ids if int(t) not in self.eos_token_ids) for ids in completion_ids])
        scores, missing, rewards = guarded_scores(result.scores.detach().float().cpu(), content, self.score_clip,
                                                  self.length_penalty, self.min_length)
        if log_metric is not None:
            # the scores as our PPO trainer reports them (after the clip, before the length guard); TRL's own
            # "reward" is the guarded reward it optimises
            log_metric("objective/scores", float(scores.mean()))
            log_metric("objective/scores_std", float(scores.std()) if scores.numel() > 1 else 0.0)
            log_metric("objective/toxicity", float(result.toxicity.float().mean()))
            log_metric("env/length_penalty_rows", float((missing > 0).float().mean()))
            for key, value in monitors.response_stats(texts).items():
                # token lengths come from TRL (env/response_length); the word-based ones stay
                if key != "length_mean" and math.isfinite(value):
                    log_metric(f"env/{key}", float(value))
        return rewards.tolist()


# ------------------------------------------------------------------------------------------------- logs


def map_trl_logs(logs: dict[str, Any], backend: str, beta: float) -> dict[str, float]:
    """TRL's averaged logs of one logging step -> our metric keys.

    TRL's ``kl`` is a mean per completion token; our ``objective/kl`` is nats per sequence, so it is multiplied
    by the mean completion length (exact: sum over tokens / tokens * tokens / sequences). RLOO's ``kl`` is the
    k1 estimate (``logprobs - ref_logprobs``, at sampling time); GRPO only computes the k3 one (during its
    updates), which lands on ``objective/kl_k3`` and, as the only KL estimate there is (both are unbiased for
    the same KL), on ``objective/kl`` too, which the gate's KL bound reads. Keys already in our namespace
    (logged by :class:`ScorerReward`) pass through; all other numbers go under ``trl/``. Non-numbers and NaN
    are dropped.
    """
    out: dict[str, float] = {}
    for key, value in logs.items():
        if not _is_number(value) or not math.isfinite(float(value)):
            continue
        value = float(value)
        if key in _DIRECT_KEYS:
            out[_DIRECT_KEYS[key]] = value
        elif key.split("/", 1)[0] in ("objective", "env", "policy", "loss"):
            out[key] = value
        else:
            out[f"trl/{key}"] = value
    length = out.get("env/response_length")
    per_token_kl = logs.get("kl")
    if _is_number(per_token_kl) and length is not None and math.isfinite(float(per_token_kl)):
        seq_kl = float(per_token_kl) * length
        out["objective/kl"] = seq_kl
        if backend == "grpo":
            out["objective/kl_k3"] = seq_kl
        if "objective/scores" in out:
            out["objective/rlhf_reward"] = out["objective/scores"] - beta * seq_kl
    out["objective/kl_coef"] = beta
    return out


def rollout_step(global_step: int, optimizer_steps_per_rollout: int) -> int:
    """TRL's optimizer step -> our 1-based rollout step (logs and checkpoints fall on rollout boundaries)."""
    return max(1, math.ceil(global_step / optimizer_steps_per_rollout))


def make_callback(log: LogFn, backend: str, beta: float, plan: StepPlan, total_steps: int) -> Any:
    """A TrainerCallback (built lazily: transformers is heavy) that forwards each rollout step's logs to ``log``,
    shows a progress bar over rollout steps like our PPO trainer, and checkpoints the final step too (so a later
    run with more ``ppo.steps`` continues from it)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    per_rollout = plan.optimizer_steps_per_rollout

    class Forwarder(TrainerCallback):
        bar: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            done = min(state.global_step // per_rollout, total_steps)
            self.bar = tqdm(total=total_steps, initial=done, desc=backend, unit="step")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_save = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            # the end-of-training summary (train_runtime, ...) carries no reward: not a rollout step
            if not logs or "reward" not in logs:
                return
            step = rollout_step(state.global_step, per_rollout)
            bad = [k for k in ("reward", "loss") if _is_number(logs.get(k)) and not math.isfinite(float(logs[k]))]
            if bad:
                raise TrainingError(
                    f"step {step}: TRL {backend} reported non-finite {', '.join(bad)}. Training stopped; lower "
                    "ppo.learning_rate or check the reward model, then rerun to resume from the last checkpoint."
                )
            metrics = map_trl_logs(logs, backend, beta)
            log(metrics, step)
            if self.bar is not None:
                kl = metrics.get("objective/kl", math.nan)
                self.bar.set_postfix(score=f"{metrics.get('objective/scores', math.nan):.3f}", kl=f"{kl:.2f}",
                                     tox=f"{metrics.get('objective/toxicity', math.nan):.3f}")
                self.bar.update(step - self.bar.n)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return Forwarder()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------- TRL setup


def truncate_prompts(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Cut prompts longer than ``max_tokens`` tokens at the front, as ``Policy.encode_queries`` does for causal
    LMs (the cue "Summary:" the model continues from is at the end); TRL 1.x no longer truncates prompts."""
    out: list[str] = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(prompt if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:]))
    return out


def build_trl_args(cfg: Config, plan: StepPlan, output_dir: Path, use_cpu: bool) -> Any:
    """The :class:`trl.RLOOConfig` / :class:`trl.GRPOConfig` for ``cfg`` (see the module docstring)."""
    from trl import GRPOConfig, RLOOConfig

    pc, gen = cfg.ppo, cfg.generation
    if pc.kl.mode == "adaptive":
        logger.warning("%s: TRL has no adaptive KL controller; beta stays at ppo.kl.init_coef=%g (ppo.kl.target is "
                       "not used)", pc.backend, pc.kl.init_coef)
    schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[pc.lr_schedule]
    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=use_cpu,
        bf16=(not use_cpu) and cfg.model.dtype == "bfloat16",
        fp16=False,
        report_to=[],
        # steps
        max_steps=plan.max_steps,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=pc.gradient_accumulation_steps,
        steps_per_generation=plan.steps_per_generation,
        num_iterations=plan.num_iterations,
        num_generations=pc.num_generations,
        # optimisation
        learning_rate=pc.learning_rate,
        lr_scheduler_type=schedule,
        warmup_steps=plan.warmup_steps,
        max_grad_norm=pc.max_grad_norm,
        weight_decay=0.0,
        beta=pc.kl.init_coef,
        epsilon=pc.cliprange,
        # generation (the same sampling settings as our PPO rollouts)
        max_completion_length=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        generation_kwargs={"min_new_tokens": gen.min_new_tokens},
        # speed/memory: the policy is a LoRA model, activations are small; our PPO does not checkpoint either
        gradient_checkpointing=False,
        # no dropout in any pass: Policy already zeroed every dropout, LoRA's included; TRL zeroes any left
        disable_dropout=True,
        # one log and (every checkpoint_every) one checkpoint per rollout step
        logging_strategy="steps",
        logging_steps=plan.optimizer_steps_per_rollout,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=pc.keep_checkpoints,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="warning",
    )
    if pc.backend == "rloo":
        # our PPO whitens its advantages; RLOO's raw leave-one-out advantages would scale with the reward
        return RLOOConfig(**common, normalize_advantages=True)
    return GRPOConfig(**common, entropy_coef=pc.ent_coef)

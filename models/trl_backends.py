"""TRL 1.x RLOO and GRPO as alternative training backends for causal LMs (``ppo.backend: rloo | grpo``).

TRL 1.x has no PPO trainer any more, but its :class:`trl.RLOOTrainer` and :class:`trl.GRPOTrainer` are good
critic-free alternatives: both sample ``ppo.num_generations`` completions per prompt and use the other
completions of the same prompt as the baseline (RLOO: leave-one-out mean; GRPO: group mean / std), so no value
head is trained. :func:`train_trl` has the signature of :func:`detoxflow.models.trainer.train`, so a dispatcher
picks the backend by ``cfg.ppo.backend`` and everything downstream (artifact, metrics, checkpoints) stays the same.

How our config, reward and metrics map onto TRL's (one rollout step = one generation batch, like a PPO step) is
:mod:`detoxflow.models.trl_mapping`; this module runs the training:

- The reference is the policy with its LoRA adapter **disabled** (the base, or the merged SFT policy), exactly
  as in our PPO: TRL copies a PEFT policy's adapter into a frozen "ref" adapter, which we delete so TRL falls
  back to ``disable_adapter()``.
- Seq2seq policies (T5) are refused: TRL 1.x RLOO/GRPO generate and score with causal LMs only.
- TRL 1.16 scores left-padded rows without ``position_ids``; :func:`mask_position_ids` supplies the ones
  ``generate()`` used, without which a GPT-2 policy's logprobs would not match its samples.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from detoxflow.config import Config
from detoxflow.models.policy import Policy
from detoxflow.models.reward import Scorer
from detoxflow.models.trainer import TrainingError, TrainResult
from detoxflow.models.trl_mapping import (
    BACKENDS,
    LogFn,
    ScorerReward,
    StepPlan,
    build_trl_args,
    check_supported,
    make_callback,
    map_trl_logs,
    plan_steps,
    rollout_step,
    truncate_prompts,
)

logger = logging.getLogger(__name__)

# the mapping's names are importable from here as before
__all__ = [
    "BACKENDS", "ScorerReward", "StepPlan", "build_trl_args", "check_supported", "map_trl_logs", "mask_position_ids",
    "plan_steps", "rollout_step", "train_trl", "truncate_prompts",
]

CHECKPOINT_SUBDIR = "checkpoints"
ARTIFACT_SUBDIR = "model"


# ------------------------------------------------------------------------------------------------- the policy under TRL


def _as_policy(cfg: Config, policy_or_model_dir: Policy | str | os.PathLike[str]) -> Policy:
    """A Policy as is, or a fresh one (base + new LoRA adapter per cfg.lora) from a model directory / hub id."""
    if isinstance(policy_or_model_dir, Policy):
        return policy_or_model_dir
    if cfg.model.arch == "seq2seq":
        check_supported(cfg.ppo.backend, True)
    model_cfg = cfg.model.model_copy(update={"name_or_path": str(policy_or_model_dir)})
    return Policy.load(model_cfg, cfg.lora)


def _drop_trl_reference_adapter(model: Any) -> None:
    """TRL copies a PEFT policy's adapter into a frozen "ref" adapter; removing it makes TRL use
    ``disable_adapter()``: the reference is then the base (or merged SFT) model, as in our PPO."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def _restore_forward(model: Any) -> None:
    """Undo TRL's fused-LM-head patch (an instance attribute ``forward``) so the policy is a plain model again."""
    base = model.get_base_model()
    base.__dict__.pop("forward", None)


@contextmanager
def mask_position_ids(model: Any) -> Iterator[None]:
    """While active, full-sequence forwards of the backbone that get no ``position_ids`` use the ones
    ``generate()`` used: ``attention_mask.cumsum(-1) - 1``.

    TRL 1.16's RLOO/GRPO score left-padded prompt+completion rows with ``input_ids`` and ``attention_mask``
    only, so a model with learned absolute positions (GPT-2) sees every padded row shifted by its pad count and
    its logprobs are not those of the distribution the completions were sampled from (measured on the tiny
    GPT-2: -6.29 instead of -3.35 nats for one token). RoPE models are shift-invariant, for them this changes
    nothing. Incremental decoding (``past_key_values``) and callers that pass ``position_ids`` are untouched.
    """
    backbone = model.get_base_model().base_model
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        yield
        return
    original = backbone.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        # input_ids arrive by keyword from TRL's fused head and positionally from e.g. GPT2LMHeadModel.forward
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        if (
            len(args) <= 1
            and kwargs.get("position_ids") is None
            and kwargs.get("past_key_values") is None
            and isinstance(mask, torch.Tensor)
            and isinstance(ids, torch.Tensor)
            and mask.dim() == 2
            and mask.shape == ids.shape
        ):
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return original(*args, **kwargs)

    backbone.forward = forward
    try:
        yield
    finally:
        backbone.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------------- train


def train_trl(
    cfg: Config,
    policy_or_model_dir: Policy | str | os.PathLike[str],
    scorer: Scorer,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    log: LogFn,
    resume: bool = True,
) -> TrainResult:
    """Train the policy's LoRA adapter with TRL RLOO or GRPO (``cfg.ppo.backend``) for ``cfg.ppo.steps`` rollout
    steps; save the model to ``out_dir/model`` (the artifact layout of :meth:`Policy.save_artifact`).

    ``policy_or_model_dir`` is a :class:`Policy` (trained in place, like :func:`trainer.train`) or a model
    directory / hub id loaded with ``cfg.model`` / ``cfg.lora``. Checkpoints go to ``out_dir/checkpoints``
    (TRL's ``checkpoint-<optimizer step>`` folders, with optimizer, scheduler and RNG state); with ``resume`` the
    newest one is continued. Raises :class:`ConfigError` for seq2seq policies and :class:`TrainingError` on
    non-finite rewards or losses.
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    pc = cfg.ppo
    backend = pc.backend
    check_supported(backend, is_seq2seq=False)
    if not prompts:
        raise TrainingError("train_trl: no prompts; check data.train_split and data.max_train_samples")
    policy = _as_policy(cfg, policy_or_model_dir)
    check_supported(backend, policy.is_seq2seq)
    if not any(p.requires_grad for p in policy.model.parameters()):
        raise TrainingError(
            "train_trl: the policy has no trainable LoRA weights (loaded with Policy.from_artifact(trainable=False)?); "
            "load it with trainable=True or from config with Policy.load"
        )

    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_SUBDIR
    if not resume and ckpt_dir.exists():
        import shutil

        logger.warning("resume=False: removing the old checkpoints in %s", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    last = get_last_checkpoint(str(ckpt_dir)) if resume and ckpt_dir.is_dir() else None

    plan = plan_steps(pc)
    args = build_trl_args(cfg, plan, ckpt_dir, use_cpu=policy.device.type == "cpu")
    dataset = Dataset.from_dict({"prompt": truncate_prompts(policy.tokenizer, prompts, cfg.data.max_query_tokens)})
    per_rollout = plan.optimizer_steps_per_rollout
    callback = make_callback(log, backend, pc.kl.init_coef, plan, pc.steps)
    eos_ids = [policy.eos_token_id]
    trainer_cls = _trainer_class(backend)
    trainer = trainer_cls(
        model=policy.model,
        reward_funcs=ScorerReward(scorer, cfg, eos_ids),
        args=args,
        train_dataset=dataset,
        processing_class=policy.tokenizer,
        callbacks=[callback],
    )
    # our callback shows progress per rollout step; TRL's printer would dump every raw log dict to stdout
    trainer.remove_callback(PrinterCallback)
    _drop_trl_reference_adapter(policy.model)
    logger.info(
        "%s: %d rollout steps x %d completions (%d prompts x %d), %d optimizer steps each; beta=%.3g%s",
        backend, pc.steps, pc.batch_size, pc.batch_size // pc.num_generations, pc.num_generations,
        per_rollout, pc.kl.init_coef, f"; resuming from {last}" if last else "",
    )
    try:
        with mask_position_ids(policy.model):
            trainer.train(resume_from_checkpoint=last)
    finally:
        _restore_forward(policy.model)
        policy.model.eval()

    steps_done = trainer.state.global_step // per_rollout
    # the trainer state carries the logs of earlier (resumed) runs too: rebuild the whole history from it
    # (one entry per rollout step, in order, like trainer.train's history)
    history = [map_trl_logs(entry, backend, pc.kl.init_coef) for entry in trainer.state.log_history if "reward" in entry]
    extra = {
        "config": cfg.model_dump(mode="json"),
        "metrics": history[-1] if history else {},
        "train": {"backend": backend, "steps": steps_done, "kl_coef": pc.kl.init_coef, "trl_version": _trl_version()},
    }
    artifact = policy.save_artifact(out / ARTIFACT_SUBDIR, extra=extra)
    newest = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    return TrainResult(
        steps=steps_done, artifact_dir=artifact, history=history, checkpoint_dir=Path(newest) if newest else None
    )


def _trainer_class(backend: str) -> Any:
    from trl import GRPOTrainer, RLOOTrainer

    return RLOOTrainer if backend == "rloo" else GRPOTrainer


def _trl_version() -> str:
    import trl

    return str(trl.__version__)

"""Where a policy's weights come from and go to: the base model (local directory, hub id, ``embedded:*``), the
supervised (SFT) adapter merged into it, a fresh PPO LoRA adapter, and the saved model artifact.

The artifact is one folder, written atomically: ``adapter/`` (the PPO LoRA adapter; its ``adapter_config.json``
names the base portably: ``../base`` or the hub id, never a path of the machine that saved it), ``value_head.pt``,
``tokenizer/``, ``base/`` (local bases only; hub bases are recorded by id and revision), ``sft_adapter/`` (if one
was merged) and ``detoxflow.json`` (arch, base, dtype, lora settings, plus the caller's ``extra``: config,
metrics). The functions here return the parts; :class:`detoxflow.models.policy.Policy` assembles them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from detoxflow.atomic import atomic_dir
from detoxflow.config import LoraSection, ModelConfig

if TYPE_CHECKING:
    from detoxflow.models.policy import Policy

log = logging.getLogger("detoxflow.models.policy")  # the name users saw before the split

ARTIFACT_META = "detoxflow.json"
PORTABLE_LOCAL_BASE = "../base"  # adapter_config.json's base of an artifact that carries its base

# LoRA targets when lora.target_modules is None: attention query/value projections, as in the LoRA paper.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
}


class PolicyError(RuntimeError):
    """A model that cannot be used as a policy; the message names it and the fix."""


@dataclass
class Loaded:
    """The parts of a policy read from config or from an artifact, before :meth:`Policy._assemble` puts them on
    a device: the PEFT model, its tokenizer, the base's provenance, the SFT adapter folder (if one was merged),
    the LoRA settings and, from an artifact, the value head's weights."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    is_seq2seq: bool
    base_source: dict[str, Any]  # {"hub_id", "revision"} or {"local": dir}
    sft_adapter: str | None
    lora_settings: dict[str, Any]
    value_state: dict[str, torch.Tensor] | None = None


def default_target_modules(base: nn.Module) -> list[str]:
    """LoRA target modules for a base model: per model_type, else any q_proj/v_proj it has."""
    model_type = getattr(base.config, "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if {"q_proj", "v_proj"} <= leaf_names:
        return ["q_proj", "v_proj"]
    raise PolicyError(
        f"no default LoRA target modules for model_type '{model_type}'; set lora.target_modules to the names of "
        f"its attention projections (e.g. ['q_proj', 'v_proj'])"
    )


def load_from_config(model_cfg: ModelConfig, lora_cfg: LoraSection) -> Loaded:
    """Resolve the base, merge the SFT adapter if any, add a fresh LoRA adapter (per ``lora_cfg``)."""
    from peft import LoraConfig, get_peft_model

    if model_cfg.num_threads:
        torch.set_num_threads(model_cfg.num_threads)
    source = _resolve_source(model_cfg.name_or_path)
    base, tokenizer, is_seq2seq, base_source = _load_base(source, model_cfg.revision, model_cfg.arch, model_cfg.dtype)
    if model_cfg.sft_adapter:
        base = _merge_sft(base, model_cfg.sft_adapter)
    targets = lora_cfg.target_modules or default_target_modules(base)
    lora = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        # GPT-2's c_attn is a Conv1D whose weight is stored transposed
        fan_in_fan_out=getattr(base.config, "model_type", "") == "gpt2",
        task_type="SEQ_2_SEQ_LM" if is_seq2seq else "CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    settings = {"r": lora_cfg.r, "alpha": lora_cfg.alpha, "dropout": lora_cfg.dropout, "target_modules": targets}
    return Loaded(model, tokenizer, is_seq2seq, base_source, model_cfg.sft_adapter, settings)


def load_artifact(path: str | os.PathLike[str], trainable: bool) -> Loaded:
    """Read a saved model artifact (see :func:`save_artifact`); the adapter is trainable only if asked."""
    from peft import PeftModel

    root = Path(path)
    meta_path = root / ARTIFACT_META
    if not meta_path.is_file():
        raise PolicyError(f"{root}: not a detoxflow model artifact (no {ARTIFACT_META}); pass the model/ folder")
    meta = json.loads(meta_path.read_text())
    base_info = meta["base"]
    if "local" in base_info:
        source, revision = str(root / base_info["local"]), None
    else:
        source, revision = base_info["hub_id"], base_info.get("revision")
    arch = meta.get("arch", "auto")
    base, _, is_seq2seq, _ = _load_base(source, revision, arch, meta.get("dtype", "float32"))
    sft = root / "sft_adapter"
    if sft.is_dir():
        base = _merge_sft(base, str(sft))
    model = PeftModel.from_pretrained(base, str(root / "adapter"), is_trainable=trainable)
    tokenizer = _load_tokenizer(str(root / "tokenizer"), None, is_seq2seq)
    value_state = torch.load(root / "value_head.pt", map_location="cpu", weights_only=True)
    base_source = base_info if "local" not in base_info else {"local": str(root / base_info["local"])}
    return Loaded(model, tokenizer, is_seq2seq, base_source, str(sft) if sft.is_dir() else None,
                  meta.get("lora", {}), value_state)


def save_artifact(policy: Policy, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``policy``'s model artifact atomically to ``path`` (the layout in the module docstring)."""
    dest = Path(path)
    with atomic_dir(dest) as tmp:
        policy.model.save_pretrained(str(tmp / "adapter"))
        portable_base_ref(tmp / "adapter", policy.base_source)
        torch.save({k: v.detach().cpu() for k, v in policy.value_head.state_dict().items()}, tmp / "value_head.pt")
        policy.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        base_meta: dict[str, Any]
        if "local" in policy.base_source:
            shutil.copytree(policy.base_source["local"], tmp / "base", ignore=shutil.ignore_patterns(".*"))
            base_meta = {"local": "base"}
        else:
            base_meta = {"hub_id": policy.base_source["hub_id"], "revision": policy.base_source.get("revision")}
        if policy.sft_adapter:
            shutil.copytree(policy.sft_adapter, tmp / "sft_adapter", ignore=shutil.ignore_patterns(".*"))
            portable_base_ref(tmp / "sft_adapter", policy.base_source)
        dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
        meta = {"arch": "seq2seq" if policy.is_seq2seq else "causal", "base": base_meta, "dtype": dtype,
                "lora": policy.lora_settings, **(extra or {})}
        (tmp / ARTIFACT_META).write_text(json.dumps(meta, indent=2, default=str))
    return dest


def portable_base_ref(adapter_dir: Path, base_source: dict[str, Any]) -> None:
    """Name the base in ``adapter_config.json`` portably: PEFT writes the base's absolute path on this machine;
    a local base is the artifact's own ``base/`` (``../base`` from the adapter folder), a hub base its id."""
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = PORTABLE_LOCAL_BASE if "local" in base_source else base_source["hub_id"]
    if "local" not in base_source and base_source.get("revision"):
        data["revision"] = base_source["revision"]
    config.write_text(json.dumps(data, indent=2, sort_keys=True))


def _resolve_source(name_or_path: str) -> str:
    """embedded:* -> the built directory (bootstrap, imported lazily: it is heavy); anything else unchanged."""
    if name_or_path.startswith("embedded:"):
        from detoxflow.models.bootstrap import resolve_model

        return str(resolve_model(name_or_path))
    return name_or_path


def _load_tokenizer(source: str, revision: str | None, is_seq2seq: bool) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.eos_token_id is None:
        raise PolicyError(f"{source}: the tokenizer has no EOS token; responses could never end. Set eos_token.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # causal LMs (GPT-2) ship without one; pads are masked anyway
    tok.padding_side = "right" if is_seq2seq else "left"
    # causal prompts end with the cue ("Summary:") the model continues from: cut long dialogues at the front
    tok.truncation_side = "right" if is_seq2seq else "left"
    return tok


def _load_base(source: str, revision: str | None, arch: str, dtype: str) -> tuple[Any, Any, bool, dict[str, Any]]:
    """-> (base model, tokenizer, is_seq2seq, base_source) for a local directory or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        raise PolicyError(
            f"model.name_or_path '{source}': cannot load a model config ({e}). Use a local save_pretrained "
            f"directory, 'embedded:t5' / 'embedded:gpt2', or a hub id with network access"
        ) from None
    is_seq2seq = bool(config.is_encoder_decoder) if arch == "auto" else arch == "seq2seq"
    cls = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    base = cls.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    tokenizer = _load_tokenizer(source, revision, is_seq2seq)
    local = Path(source).is_dir()
    base_source = {"local": str(Path(source).resolve())} if local else {"hub_id": source, "revision": revision}
    return base, tokenizer, is_seq2seq, base_source


def _merge_sft(base: Any, adapter_path: str) -> Any:
    """Fold a supervised LoRA adapter into the base weights, so that "adapter off" later means the SFT policy."""
    from peft import PeftModel

    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise PolicyError(f"model.sft_adapter '{adapter_path}': no adapter_config.json there; pass a peft adapter folder")
    log.info("merging SFT adapter %s into the base", adapter_path)
    return PeftModel.from_pretrained(base, adapter_path).merge_and_unload()

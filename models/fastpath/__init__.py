"""A functional ("fast path") forward for GPT-2, T5 and the Llama family under a PEFT LoRA adapter.

At tiny sizes (d_model 128, 2 layers) a PPO step's time is per-op dispatch through the HF/PEFT module stack, not
arithmetic: transformers builds masks and output objects on every call and PEFT adds a wrapper and a dropout
call per LoRA layer (docs/benchmarks.md, section 2). The functions here compute the same forward with plain
tensor ops over the *same parameters* (read from the modules once, never copied), so gradients reach the LoRA
A/B weights exactly as through the modules, and the policy's three passes (incremental decoding, the training
forward, the adapter-off reference forward) skip that machinery:

- every targeted linear computes ``x W^T + b + scaling * (x A^T) B^T`` for the active adapter (no pass uses
  dropout, LoRA's included: ``common.py``), or the base alone when the adapter is disabled (the reference pass)
  or merged (PEFT's ``merged`` flag, or the policy's sampling merge, which disables the adapter);
- incremental decoding keeps K/V in preallocated ``(B, heads, max_len, d_head)`` buffers written in place, and
  builds masks (and T5's relative position bias, encoder output and cross-attention K/V) once per rollout.

:func:`build` returns ``None`` with the reason for anything it does not implement; the caller then keeps the
HF path, which stays the reference implementation. Only float32 weights are supported (HF's half-precision
casts and clamps are not reproduced).

Layout: ``common.py`` holds what every family shares; one module per model family (``gpt2.py``, ``t5.py``, ``llama.py``)
holds its forward and decoding. Adding a family means adding its module and one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from detoxflow.models.fastpath.common import FastBase, Linear, Unsupported, dropouts, linear
from detoxflow.models.fastpath.gpt2 import FastGPT2
from detoxflow.models.fastpath.llama import FastLlama
from detoxflow.models.fastpath.t5 import FastT5

# the HF model class a family implements (``type(peft_model.get_base_model()).__name__``) -> its fast path
FAMILIES: dict[str, type[FastBase]] = {
    "GPT2LMHeadModel": FastGPT2,
    "T5ForConditionalGeneration": FastT5,
    "LlamaForCausalLM": FastLlama,
    "Qwen2ForCausalLM": FastLlama,
    "MistralForCausalLM": FastLlama,
}

__all__ = ["FAMILIES", "FastBase", "FastGPT2", "FastLlama", "FastT5", "Linear", "Unsupported", "build", "dropouts", "linear"]


def build(model: Any, adapter: str = "default") -> tuple[Any | None, str]:
    """``-> (fast path or None, reason)`` for a PEFT-wrapped HF model."""
    base = model.get_base_model()
    name = type(base).__name__
    if name not in FAMILIES:
        return None, f"model class {name} has no fast path (supported: {', '.join(FAMILIES)})"
    try:
        fast = FAMILIES[name](model, adapter)
        fast.check_covered(model)
        return fast, f"functional {fast.arch} forward"
    except Unsupported as e:
        return None, f"{name} uses {e}, which the fast path does not implement"

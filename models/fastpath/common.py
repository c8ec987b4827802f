"""What the fast-path model families share: the LoRA linear over a module's own parameters, attention, masks,
the refusals common to all families (:class:`Unsupported`), the scan for dropout, and the base class that reads
the adapter's on/off state per call.

The rule for every family: no dropout in any pass (rollout, training forward, reference). PPO's ratio and KL
compare these passes token by token, so they must compute the same function; the policy turns every dropout off
(LoRA's included) and :func:`check_model` refuses a model that still has one.

A family module (``gpt2.py``, ``t5.py``) builds on these and is registered in ``__init__.py``'s ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Decode = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, None]

ACTS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class Unsupported(Exception):
    """The model uses something the fast path does not implement; the message says what."""


# ---------------------------------------------------------------------------------------------- linear + LoRA


@dataclass
class Linear:
    """One linear layer: the base weight ``(out, in)`` (``nn.Linear``) or ``(in, out)`` (GPT-2's ``Conv1D``,
    ``conv1d=True``), its bias, and the adapter's LoRA ``a (r, in)``, ``b (out, r)`` if the layer is targeted.
    All are the modules' own parameters (so in-place updates, the sampling merge and gradients all apply)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    conv1d: bool = False
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scaling: float = 1.0


def linear(x: torch.Tensor, lin: Linear, lora: bool) -> torch.Tensor:
    """``(..., in) -> (..., out)``: base linear plus, when ``lora``, ``scaling * B A x`` (PEFT's order of
    operations; no dropout in any pass, module docstring)."""
    if lin.conv1d:  # HF Conv1D: addmm over the flattened rows
        y = torch.addmm(lin.bias, x.reshape(-1, x.shape[-1]), lin.weight).view(*x.shape[:-1], lin.weight.shape[1])
    else:
        y = F.linear(x, lin.weight, lin.bias)
    if lora and lin.a is not None:
        y = y + F.linear(F.linear(x, lin.a), lin.b) * lin.scaling
    return y


def wrap(module: nn.Module, adapter: str) -> Linear:
    """A :class:`Linear` over an HF linear or a PEFT LoRA layer wrapping one."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        lin = wrap(base, adapter)
        if adapter in module.lora_A:
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(adapter):
                raise Unsupported(f"LoRA variant (DoRA / lora_bias) on {type(module).__name__}")
            if module.lora_A[adapter].bias is not None or module.lora_B[adapter].bias is not None:
                raise Unsupported("LoRA layers with a bias")
            lin.a, lin.b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            lin.scaling = float(module.scaling[adapter])
        return lin
    name = type(module).__name__
    if name == "Conv1D":
        return Linear(module.weight, module.bias, conv1d=True)
    if type(module) is nn.Linear:
        return Linear(module.weight, module.bias)
    raise Unsupported(f"linear layer of type {name}")


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, explicit_grad: bool = True
) -> torch.Tensor:
    """``q (B, h, T, d), k/v (B, h, S, d), mask (B|1, 1|h, T, S)`` (bool: attend; or float: added) ``-> (B, T, h*d)``.

    SDPA, except on CPU with an additive mask in two cases where three explicit ops are faster: without autograd
    and several queries (1.3-1.4x at B 16, T 69-101, d 32, 2 threads; SDPA keeps the single-query decode step),
    and under autograd when ``explicit_grad`` (T5's position bias: SDPA's flash backward costs 1.2-1.5x there,
    measured at B 4, T 96, d 32-64, 1 thread; with a padding or causal mask it goes the other way, 1.1-2.1x in
    SDPA's favour at B 4, T 33-101, S 101, 2 threads, so GPT-2 and T5's cross-attention pass False)."""
    if mask is not None and mask.dtype != torch.bool and q.device.type == "cpu" and (
        (q.requires_grad and explicit_grad) or (not q.requires_grad and q.shape[2] > 1)
    ):
        scores = torch.matmul(q, k.transpose(-1, -2))
        if scale != 1.0:
            scores = scores * scale
        out = torch.matmul((scores + mask).softmax(dim=-1), v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool ``allowed`` -> the same shape in ``dtype``: 0 where allowed, the dtype's minimum elsewhere (finite, so a
    row with nothing allowed gives no NaN). Built once per forward or rollout: SDPA would otherwise convert a bool
    mask on every call."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def causal_mask(key_valid: torch.Tensor, t: int) -> torch.Tensor:
    """``key_valid (B, S) -> (B, 1, t, S)`` bool: query ``i`` attends to valid keys at positions ``<= i``. A query
    with no such key (a left-pad position of a causal prompt) attends to itself instead: its output is never read,
    but a fully masked row would put NaN into the keys and values later positions mask out (0 * NaN is NaN)."""
    s = key_valid.shape[1]
    pos_q = torch.arange(t, device=key_valid.device)
    pos_k = torch.arange(s, device=key_valid.device)
    allowed = (pos_k[None, :] <= pos_q[:, None])[None] & key_valid[:, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & (pos_k[None, :] == pos_q[:, None])[None])
    return allowed.unsqueeze(1)


def check_model(model: Any, adapter: str) -> Any:
    """Common refusals; returns the first LoRA layer (read per call for the adapter's on/off/merged state)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    checkpointing = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(base, checkpointing, False):
        raise Unsupported("gradient checkpointing")
    if getattr(base, "hf_quantizer", None) is not None or getattr(base.config, "quantization_config", None):
        raise Unsupported("quantised weights")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise Unsupported(f"parameter dtypes {sorted(str(d) for d in dtypes)} (only float32)")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise Unsupported("no LoRA layers")
    for m in layers:
        if list(m.active_adapters) != [adapter]:
            raise Unsupported(f"active adapters {list(m.active_adapters)} (only the single adapter '{adapter}')")
    for name, _, attr, value in dropouts(model):
        raise Unsupported(f"dropout {attr}={value} at {name} (no pass may use dropout; the policy turns it off)")
    return layers[0]


def dropouts(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, float]]:
    """Every dropout of ``model`` that is on, LoRA's included, in module order: ``(module name, module, attribute,
    probability)``, the attribute being ``p`` of an ``nn.Dropout`` (LoRA's ``lora_dropout`` is one) or an
    attention-probability dropout kept as a plain float (``dropout``: T5Attention; ``attention_dropout``: Llama).
    Setting the attribute to 0 turns it off; the policy does that for all of them, and the fast path refuses a
    model that still has one."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            yield name, m, "p", m.p
        for attr in ("dropout", "attention_dropout"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:
                yield name, m, attr, value


def _linears(obj: Any) -> list[Linear]:
    """Every :class:`Linear` reachable from ``obj``'s attributes (blocks, lists, dataclass fields)."""
    if isinstance(obj, Linear):
        return [obj]
    if isinstance(obj, list | tuple):
        return [v for item in obj for v in _linears(item)]
    if isinstance(obj, FastBase) or hasattr(obj, "__dataclass_fields__"):
        return [v for item in vars(obj).values() for v in _linears(item)]
    return []


class FastBase:
    """What every family shares: the adapter state read per call from one of PEFT's LoRA layers."""

    arch: str  # the family's name, for the log line of :func:`detoxflow.models.fastpath.build`

    def __init__(self, model: Any, adapter: str) -> None:
        self.probe = check_model(model, adapter)
        self.adapter = adapter
        self.forced_off = False

    @contextmanager
    def adapter_off(self) -> Iterator[None]:
        """The adapter off for the passes inside (the reference pass; sampling with LoRA merged into the weights).
        PEFT's ``disable_adapter()`` does the same for the module path but walks every module to check the
        adapters' state first: ~4 ms a use at tiny sizes, and a PPO step uses it twice."""
        before, self.forced_off = self.forced_off, True
        try:
            yield
        finally:
            self.forced_off = before

    def check_covered(self, model: Any) -> None:
        """Refuse LoRA on any module this forward does not read through :func:`linear` (embeddings, norms, ...):
        it would silently be left out."""
        from peft.tuners.lora import LoraLayer

        seen = {id(v.a) for v in _linears(self) if v.a is not None}
        for name, m in model.named_modules():
            if not isinstance(m, LoraLayer):
                continue
            if self.adapter in getattr(m, "lora_embedding_A", {}):
                raise Unsupported(f"LoRA on the embedding {name}")
            if self.adapter in m.lora_A and id(m.lora_A[self.adapter].weight) not in seen:
                raise Unsupported(f"LoRA on {name}")

    def lora_on(self) -> bool:
        """Whether the adapter applies: off inside :meth:`adapter_off` or PEFT's ``disable_adapter()``, or when PEFT
        merged it into the base. Train mode changes nothing (no pass applies dropout)."""
        p = self.probe
        return not self.forced_off and not p.disable_adapters and not p.merged


"""A functional ("fast path") forward for GPT-2 and T5 under a PEFT LoRA adapter.

At tiny sizes (d_model 128, 2 layers) a PPO step's time is per-op dispatch through the HF/PEFT module stack, not
arithmetic: transformers builds masks and output objects on every call and PEFT adds a wrapper and a dropout
call per LoRA layer (docs/benchmarks.md, section 2). The functions here compute the same forward with plain
tensor ops over the *same parameters* (read from the modules once, never copied), so gradients reach the LoRA
A/B weights exactly as through the modules, and the policy's three passes (incremental decoding, the training
forward, the adapter-off reference forward) skip that machinery:

- every targeted linear computes ``x W^T + b + scaling * (dropout(x) A^T) B^T`` for the active adapter, or the
  base alone when the adapter is disabled (the reference pass) or merged (PEFT's ``merged`` flag, or the
  policy's sampling merge, which disables the adapter);
- incremental decoding keeps K/V in preallocated ``(B, heads, max_len, d_head)`` buffers written in place, and
  builds masks (and T5's relative position bias, encoder output and cross-attention K/V) once per rollout.

:func:`build` returns ``None`` with the reason for anything it does not implement; the caller then keeps the
HF path, which stays the reference implementation. Only float32 weights are supported (HF's half-precision
casts and clamps are not reproduced).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Decode = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, None]

_ACTS = {
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
    dropout: float = 0.0


def linear(x: torch.Tensor, lin: Linear, lora: bool, training: bool) -> torch.Tensor:
    """``(..., in) -> (..., out)``: base linear plus, when ``lora``, ``scaling * B A dropout(x)`` (PEFT's order of
    operations, so LoRA dropout draws the same mask from the same RNG state)."""
    if lin.conv1d:  # HF Conv1D: addmm over the flattened rows
        y = torch.addmm(lin.bias, x.reshape(-1, x.shape[-1]), lin.weight).view(*x.shape[:-1], lin.weight.shape[1])
    else:
        y = F.linear(x, lin.weight, lin.bias)
    if lora and lin.a is not None:
        if training and lin.dropout > 0:
            x = F.dropout(x, lin.dropout, training=True)
        y = y + F.linear(F.linear(x, lin.a), lin.b) * lin.scaling
    return y


def _wrap(module: nn.Module, adapter: str) -> Linear:
    """A :class:`Linear` over an HF linear or a PEFT LoRA layer wrapping one."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        lin = _wrap(base, adapter)
        if adapter in module.lora_A:
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(adapter):
                raise Unsupported(f"LoRA variant (DoRA / lora_bias) on {type(module).__name__}")
            if module.lora_A[adapter].bias is not None or module.lora_B[adapter].bias is not None:
                raise Unsupported("LoRA layers with a bias")
            drop = module.lora_dropout[adapter]
            lin.a, lin.b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            lin.scaling = float(module.scaling[adapter])
            lin.dropout = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        return lin
    name = type(module).__name__
    if name == "Conv1D":
        return Linear(module.weight, module.bias, conv1d=True)
    if type(module) is nn.Linear:
        return Linear(module.weight, module.bias)
    raise Unsupported(f"linear layer of type {name}")


def _attend(
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


def causal_mask(key_valid: torch.Tensor, t: int, start: int = 0) -> torch.Tensor:
    """``key_valid (B, S) -> (B, 1, t, S)`` bool: query ``i`` (absolute position ``start + i``) attends to valid keys
    at positions ``<= start + i``. A query with no such key (a left-pad position of a causal prompt) attends to
    itself instead: its output is never read, but a fully masked row would put NaN into the keys and values later
    positions mask out (0 * NaN is NaN)."""
    s = key_valid.shape[1]
    pos_q = torch.arange(start, start + t, device=key_valid.device)
    pos_k = torch.arange(s, device=key_valid.device)
    allowed = (pos_k[None, :] <= pos_q[:, None])[None] & key_valid[:, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & (pos_k[None, :] == pos_q[:, None])[None])
    return allowed.unsqueeze(1)


def _check_model(model: Any, adapter: str) -> Any:
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
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise Unsupported(f"base dropout p={m.p} at {name}")
        for attr in ("dropout", "attention_dropout"):  # attention-probability dropout kept as a float (T5, Llama)
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:
                raise Unsupported(f"attention dropout {attr}={value} at {name}")
    return layers[0]


def _linears(obj: Any) -> list[Linear]:
    """Every :class:`Linear` reachable from ``obj``'s attributes (blocks, lists, dataclass fields)."""
    if isinstance(obj, Linear):
        return [obj]
    if isinstance(obj, list | tuple):
        return [v for item in obj for v in _linears(item)]
    if isinstance(obj, _Fast) or hasattr(obj, "__dataclass_fields__"):
        return [v for item in vars(obj).values() for v in _linears(item)]
    return []


class _Fast:
    """What both architectures share: the adapter state read per call from one of PEFT's LoRA layers."""

    def __init__(self, model: Any, adapter: str) -> None:
        self.probe = _check_model(model, adapter)
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

    def lora_state(self) -> tuple[bool, bool]:
        """``(adapter on, train mode)``: off inside :meth:`adapter_off` or PEFT's ``disable_adapter()``, or when PEFT
        merged it into the base; train mode decides LoRA dropout."""
        p = self.probe
        on = not self.forced_off and not p.disable_adapters and not p.merged
        return on, bool(p.lora_dropout[self.adapter].training)


# ---------------------------------------------------------------------------------------------- GPT-2


@dataclass
class _GPT2Block:
    ln1: tuple[torch.Tensor, torch.Tensor]
    c_attn: Linear
    attn_proj: Linear
    ln2: tuple[torch.Tensor, torch.Tensor]
    c_fc: Linear
    mlp_proj: Linear
    scale: float


class FastGPT2(_Fast):
    """``GPT2LMHeadModel`` (no cross-attention, no token types)."""

    arch = "gpt2"

    def __init__(self, model: Any, adapter: str = "default") -> None:
        super().__init__(model, adapter)
        base = model.get_base_model()
        cfg = base.config
        if getattr(cfg, "add_cross_attention", False):
            raise Unsupported("GPT-2 cross-attention")
        if getattr(cfg, "reorder_and_upcast_attn", False):
            raise Unsupported("reorder_and_upcast_attn")
        if cfg.activation_function not in _ACTS:
            raise Unsupported(f"activation_function '{cfg.activation_function}'")
        self.act = _ACTS[cfg.activation_function]
        t = base.transformer
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.eps = float(cfg.layer_norm_epsilon)
        self.heads = int(cfg.n_head)
        self.d = int(cfg.n_embd)
        self.blocks = []
        for i, blk in enumerate(t.h):
            scale = blk.attn.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            self.blocks.append(_GPT2Block(
                (blk.ln_1.weight, blk.ln_1.bias), _wrap(blk.attn.c_attn, adapter), _wrap(blk.attn.c_proj, adapter),
                (blk.ln_2.weight, blk.ln_2.bias), _wrap(blk.mlp.c_fc, adapter), _wrap(blk.mlp.c_proj, adapter), scale,
            ))
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.lm_head = _wrap(base.lm_head, adapter)
        if self.lm_head.a is not None:
            raise Unsupported("LoRA on lm_head")

    def _hidden(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, lora: bool, training: bool,
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None, start: int = 0, keep: slice | None = None,
    ) -> torch.Tensor:
        """``ids, position_ids (B, T), mask (B, 1, T, S) -> final hidden state (B, T, H)`` (after ``ln_f``). With
        ``kv``, this call's keys/values are written into the buffers at ``[start, start + T)`` and attention runs
        over ``[0, start + T)`` (``S = start + T``).

        ``keep``: only these positions' hidden states are wanted (``-> (B, len(keep), H)``). The last block then
        projects keys and values at every position (the kept queries attend to them) but runs its queries,
        attention, MLP and residual stream at the kept positions alone: every position is independent there. That
        block is half of a 2-layer model's forward, and the response is a third of a PPO sequence."""
        b, t = ids.shape
        d, nh = self.d, self.heads
        last = len(self.blocks) - 1
        x = F.embedding(ids, self.wte) + F.embedding(position_ids, self.wpe)
        for i, blk in enumerate(self.blocks):
            h = F.layer_norm(x, (d,), blk.ln1[0], blk.ln1[1], self.eps)
            q, k, v = linear(h, blk.c_attn, lora, training).view(b, t, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
            if kv is not None:
                kb, vb = kv[i]
                kb[:, :, start : start + t] = k
                vb[:, :, start : start + t] = v
                k, v = kb[:, :, : start + t], vb[:, :, : start + t]
            if i == last and keep is not None:
                x, q, mask = x[:, keep], q[:, :, keep], mask[:, :, keep]
            x = x + linear(_attend(q, k, v, mask, blk.scale, explicit_grad=False), blk.attn_proj, lora, training)
            h = F.layer_norm(x, (d,), blk.ln2[0], blk.ln2[1], self.eps)
            x = x + linear(self.act(linear(h, blk.c_fc, lora, training)), blk.mlp_proj, lora, training)
        return F.layer_norm(x, (d,), self.ln_f[0], self.ln_f[1], self.eps)

    def forward_causal(
        self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, tq: int, tr: int, want_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ids, mask, position_ids (B, Tq + Tr) -> logits (B, Tr, V), hidden (B, Tr, H) or None``: the positions
        ``tq - 1 .. tq + tr - 2`` that predict the response tokens (what ``Policy._run`` returns)."""
        lora, training = self.lora_state()
        allowed = causal_mask(mask.bool(), ids.shape[1])
        hidden = self._hidden(ids, position_ids, additive_mask(allowed, self.wte.dtype), lora, training,
                              keep=slice(tq - 1, tq - 1 + tr))
        logits = linear(hidden, self.lm_head, False, False)
        return logits, hidden if want_hidden else None

    def decode_steps(self, query_ids: torch.Tensor, query_mask: torch.Tensor, n_new: int) -> Decode:
        """The generator of ``Policy._decode_steps`` for left-padded causal queries: positions count real tokens,
        generated tokens always attend (as the HF path)."""
        lora, training = self.lora_state()
        b, tq = query_ids.shape
        total, nh = tq + n_new, self.heads
        kv = [(query_ids.new_empty((b, nh, total, self.d // nh), dtype=self.wte.dtype),
               query_ids.new_empty((b, nh, total, self.d // nh), dtype=self.wte.dtype)) for _ in self.blocks]
        valid = torch.cat([query_mask.bool(), query_mask.new_ones((b, n_new), dtype=torch.bool)], dim=1)
        position = (query_mask.long().cumsum(1) - 1).clamp(min=0)
        prefill_mask = additive_mask(causal_mask(valid[:, :tq], tq), self.wte.dtype)
        hidden = self._hidden(query_ids, position, prefill_mask, lora, training, kv, 0, keep=slice(tq - 1, tq))[:, -1]
        # (B, 1, 1, total): one query row, sliced to the filled length
        step_mask = additive_mask(valid[:, None, None, :], self.wte.dtype)
        position = position[:, -1:]
        for t in range(n_new):
            token = yield linear(hidden, self.lm_head, False, False), hidden
            position = position + 1
            cur = tq + t
            hidden = self._hidden(token.unsqueeze(1), position, step_mask[..., : cur + 1], lora, training, kv, cur)[:, -1]


# ---------------------------------------------------------------------------------------------- T5


@dataclass
class _T5Attn:
    ln: torch.Tensor  # the RMS norm before the attention
    q: Linear
    k: Linear
    v: Linear
    o: Linear


@dataclass
class _T5Block:
    self_attn: _T5Attn
    cross: _T5Attn | None  # decoder blocks only
    ff_ln: torch.Tensor
    wi: Linear | None  # relu / plain activation
    wi_0: Linear | None  # gated activation: act(wi_0 x) * wi_1 x
    wi_1: Linear | None
    wo: Linear


def relative_position_bias(
    table: torch.Tensor, attn_cls: Any, q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's learned relative position bias ``table (num_buckets, heads) -> (1, heads, q_len, k_len)``, with HF's
    bucketing function (``attn_cls._relative_position_bucket``) so the buckets are the same by construction."""
    pos = torch.arange(k_len, device=table.device)[None, :] - torch.arange(q_len, device=table.device)[:, None]
    buckets = attn_cls._relative_position_bucket(pos, bidirectional=bidirectional, num_buckets=num_buckets,
                                                 max_distance=max_distance)
    return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)


def _additive(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``bias (1, h, T, S)`` where ``allowed (B, 1, T|1, S)``, the dtype's minimum elsewhere (as HF's eager T5:
    finite, so no NaN from rows that are all padding) ``-> (B, h, T, S)``."""
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


class FastT5(_Fast):
    """``T5ForConditionalGeneration`` (relu or gated activations, relative position bias in the first layer of
    each stack, decoder output rescaled by ``d_model ** -0.5`` when the config says so)."""

    arch = "t5"

    def __init__(self, model: Any, adapter: str = "default") -> None:
        super().__init__(model, adapter)
        base = model.get_base_model()
        cfg = base.config
        act = getattr(cfg, "dense_act_fn", None)
        if act not in _ACTS:
            raise Unsupported(f"dense_act_fn '{act}'")
        self.act = _ACTS[act]
        self.eps = float(cfg.layer_norm_epsilon)
        self.d = int(cfg.d_model)
        self.heads, self.d_kv = int(cfg.num_heads), int(cfg.d_kv)
        self.buckets, self.max_distance = int(cfg.relative_attention_num_buckets), int(cfg.relative_attention_max_distance)
        self.scale_out = float(cfg.d_model) ** -0.5 if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings) else None
        self.enc_embed, self.dec_embed = base.encoder.embed_tokens.weight, base.decoder.embed_tokens.weight
        self.enc_blocks = [self._block(b, adapter, decoder=False) for b in base.encoder.block]
        self.dec_blocks = [self._block(b, adapter, decoder=True) for b in base.decoder.block]
        first_enc, first_dec = base.encoder.block[0].layer[0].SelfAttention, base.decoder.block[0].layer[0].SelfAttention
        for stack in (base.encoder, base.decoder):
            for i, b in enumerate(stack.block):
                if b.layer[0].SelfAttention.has_relative_attention_bias != (i == 0):
                    raise Unsupported("relative attention bias outside the first layer")
        self.attn_cls = type(first_enc)
        self.enc_rel, self.dec_rel = first_enc.relative_attention_bias.weight, first_dec.relative_attention_bias.weight
        self.enc_ln, self.dec_ln = base.encoder.final_layer_norm.weight, base.decoder.final_layer_norm.weight
        self.lm_head = _wrap(base.lm_head, adapter)
        if self.lm_head.a is not None:
            raise Unsupported("LoRA on lm_head")

    @staticmethod
    def _block(block: Any, adapter: str, decoder: bool) -> _T5Block:
        def attn(layer: Any, mod: Any) -> _T5Attn:
            return _T5Attn(layer.layer_norm.weight, *(_wrap(getattr(mod, n), adapter) for n in ("q", "k", "v", "o")))

        sa = attn(block.layer[0], block.layer[0].SelfAttention)
        cross = attn(block.layer[1], block.layer[1].EncDecAttention) if decoder else None
        ff_layer = block.layer[2 if decoder else 1]
        dense = ff_layer.DenseReluDense
        gated = hasattr(dense, "wi_0")
        return _T5Block(sa, cross, ff_layer.layer_norm.weight, None if gated else _wrap(dense.wi, adapter),
                        _wrap(dense.wi_0, adapter) if gated else None, _wrap(dense.wi_1, adapter) if gated else None,
                        _wrap(dense.wo, adapter))

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.d,), w, self.eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, h * d_kv) -> (B, h, T, d_kv)``"""
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def _ff(self, x: torch.Tensor, blk: _T5Block, lora: bool, training: bool) -> torch.Tensor:
        h = self._norm(x, blk.ff_ln)
        if blk.wi is not None:
            h = self.act(linear(h, blk.wi, lora, training))
        else:
            h = self.act(linear(h, blk.wi_0, lora, training)) * linear(h, blk.wi_1, lora, training)
        return x + linear(h, blk.wo, lora, training)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, lora: bool, training: bool) -> torch.Tensor:
        """``ids, mask (B, Ts) -> encoder output (B, Ts, d)`` (after the final norm)."""
        t = ids.shape[1]
        bias = relative_position_bias(self.enc_rel, self.attn_cls, t, t, True, self.buckets, self.max_distance)
        bias = _additive(bias, mask.bool()[:, None, None, :])
        x = F.embedding(ids, self.enc_embed)
        for blk in self.enc_blocks:
            a = blk.self_attn
            h = self._norm(x, a.ln)
            q, k, v = (self._heads(linear(h, lin, lora, training)) for lin in (a.q, a.k, a.v))
            x = x + linear(_attend(q, k, v, bias, 1.0), a.o, lora, training)
            x = self._ff(x, blk, lora, training)
        return self._norm(x, self.enc_ln)

    def _cross_kv(self, enc: torch.Tensor, lora: bool, training: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention ``(K, V)`` per decoder layer, ``(B, h, Ts, d_kv)`` each, contiguous: they are read once per
        generated token, and SDPA on the transposed views costs ~1.5x as much (measured at B 16, Ts 64)."""
        return [(self._heads(linear(enc, b.cross.k, lora, training)).contiguous(),
                 self._heads(linear(enc, b.cross.v, lora, training)).contiguous()) for b in self.dec_blocks]

    def _decoder_layer(
        self, x: torch.Tensor, blk: _T5Block, self_bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None,
        cross_in: torch.Tensor | tuple[torch.Tensor, torch.Tensor], cross_mask: torch.Tensor, lora: bool,
        training: bool, start: int,
    ) -> torch.Tensor:
        """One decoder block. ``kv``: self-attention buffers written at ``[start, start + T)``, attention over
        ``[0, start + T)``; ``cross_in``: the encoder output (K/V projected here, in HF's op order: q first, so LoRA
        dropout draws match) or the ``(K, V)`` projected once per rollout."""
        a, c = blk.self_attn, blk.cross
        t = x.shape[1]
        h = self._norm(x, a.ln)
        q, k, v = (self._heads(linear(h, lin, lora, training)) for lin in (a.q, a.k, a.v))
        if kv is not None:
            kv[0][:, :, start : start + t] = k
            kv[1][:, :, start : start + t] = v
            k, v = kv[0][:, :, : start + t], kv[1][:, :, : start + t]
        x = x + linear(_attend(q, k, v, self_bias, 1.0), a.o, lora, training)
        h = self._norm(x, c.ln)
        q = self._heads(linear(h, c.q, lora, training))
        if isinstance(cross_in, tuple):
            k, v = cross_in
        else:
            k, v = self._heads(linear(cross_in, c.k, lora, training)), self._heads(linear(cross_in, c.v, lora, training))
        x = x + linear(_attend(q, k, v, cross_mask, 1.0, explicit_grad=False), c.o, lora, training)
        return self._ff(x, blk, lora, training)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden * self.scale_out if self.scale_out is not None else hidden, self.lm_head, False, False)

    def forward_seq2seq(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor, want_hidden: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``-> logits (B, Td, V), decoder last hidden state (B, Td, d) or None`` (what ``Policy._run`` returns)."""
        lora, training = self.lora_state()
        enc = self.encode(input_ids, attention_mask, lora, training)
        td = decoder_input_ids.shape[1]
        self_bias = relative_position_bias(self.dec_rel, self.attn_cls, td, td, False, self.buckets, self.max_distance)
        self_bias = _additive(self_bias, causal_mask(decoder_attention_mask.bool(), td))
        cross_mask = additive_mask(attention_mask.bool()[:, None, None, :], enc.dtype)
        x = F.embedding(decoder_input_ids, self.dec_embed)
        for blk in self.dec_blocks:
            x = self._decoder_layer(x, blk, self_bias, None, enc, cross_mask, lora, training, 0)
        hidden = self._norm(x, self.dec_ln)
        return self._head(hidden), hidden if want_hidden else None

    def decode_steps(self, query_ids: torch.Tensor, query_mask: torch.Tensor, n_new: int, start_token: int) -> Decode:
        """The generator of ``Policy._decode_steps``: the encoder and the cross-attention K/V once, then one decoder
        position per call with self-attention K/V in static buffers and the causal position bias built once."""
        lora, training = self.lora_state()
        b = query_ids.shape[0]
        enc = self.encode(query_ids, query_mask, lora, training)
        cross = self._cross_kv(enc, lora, training)
        cross_mask = additive_mask(query_mask.bool()[:, None, None, :], enc.dtype)
        # generated tokens always attend (as HF decoding without a decoder mask): causal bias, no padding
        bias = relative_position_bias(self.dec_rel, self.attn_cls, n_new, n_new, False, self.buckets, self.max_distance)
        kv = [(enc.new_empty((b, self.heads, n_new, self.d_kv)), enc.new_empty((b, self.heads, n_new, self.d_kv)))
              for _ in self.dec_blocks]
        token = query_ids.new_full((b,), start_token)
        for t in range(n_new):
            x = F.embedding(token.unsqueeze(1), self.dec_embed)
            step_bias = bias[:, :, t : t + 1, : t + 1]
            for blk, buf, ckv in zip(self.dec_blocks, kv, cross, strict=True):
                x = self._decoder_layer(x, blk, step_bias, buf, ckv, cross_mask, lora, training, t)
            hidden = self._norm(x, self.dec_ln)[:, -1]
            token = yield self._head(hidden), hidden


# ---------------------------------------------------------------------------------------------- entry point


def build(model: Any, adapter: str = "default") -> tuple[Any | None, str]:
    """``-> (fast path or None, reason)`` for a PEFT-wrapped HF model."""
    base = model.get_base_model()
    name = type(base).__name__
    classes = {"GPT2LMHeadModel": FastGPT2, "T5ForConditionalGeneration": FastT5}
    if name not in classes:
        return None, f"model class {name} has no fast path (supported: {', '.join(classes)})"
    try:
        fast = classes[name](model, adapter)
        fast.check_covered(model)
        return fast, f"functional {fast.arch} forward"
    except Unsupported as e:
        return None, f"{name} uses {e}, which the fast path does not implement"

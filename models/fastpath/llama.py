"""The fast path for the Llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``):
RMSNorm, rotary position embeddings, SwiGLU and grouped-query attention; the training / reference forward over a
left-padded ``query + response`` batch and incremental decoding with preallocated K/V buffers holding the
key/value heads only (see the package docstring).

What it implements, and refuses otherwise (the caller keeps the HF path, with the reason logged):

- RoPE without scaling (``rope_type`` ``default``), ``linear`` and ``llama3`` scaling: all three fix the inverse
  frequencies once, so they are read from the model's own rotary module (``inv_freq``, ``attention_scaling``),
  computed by HF's functions. ``dynamic`` / ``yarn`` / ``longrope`` / others are refused.
- full causal attention in every layer: a sliding window (Mistral's ``sliding_window``, Qwen2's
  ``sliding_attention`` layers) is refused.
- ``silu`` gated MLP, biases wherever the config puts them (Qwen2's q/k/v, Llama's ``attention_bias`` /
  ``mlp_bias``), tied or untied LM head, ``head_dim`` other than ``hidden_size / heads``.

No dropout is applied in any pass, LoRA dropout included: the rollout, the training forward and the reference
score the same function of the weights. Passes return logits; the sampling filters live in the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from detoxflow.models.fastpath.common import (
    Decode,
    FastBase,
    Linear,
    Unsupported,
    additive_mask,
    attend,
    causal_mask,
    linear,
    wrap,
)

ROPE_TYPES = ("default", "linear", "llama3")
MLP_ACTS = {"silu": F.silu, "swish": F.silu}


@dataclass
class _LlamaBlock:
    ln1: torch.Tensor  # input_layernorm weight
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ln2: torch.Tensor  # post_attention_layernorm weight
    gate: Linear
    up: Linear
    down: Linear
    scale: float


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``position_ids (B, T), inv_freq (d/2,) -> cos, sin (B, 1, T, d)``, as HF's rotary embedding computes them
    (float32 product, halves concatenated, times the rope type's attention scaling)."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.unsqueeze(1), sin.unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (B, h, T, d)`` rotated: ``x cos + rotate_half(x) sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def gqa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``q (B, h, T, d), k/v (B, g, S, d)`` with ``h = g * rep``, ``mask (B, 1, rep * T, S)`` when ``rep > 1`` and
    ``T > 1`` (:func:`tile_mask`), else ``(B, 1, T, S)`` ``-> (B, T, h * d)``.

    Query head ``j`` reads key/value head ``j // rep`` (HF's ``repeat_kv``). The ``rep`` query heads of a group are
    folded into the query axis, so the key/value heads are attended without being copied ``rep`` times."""
    b, h, t, d = q.shape
    g = k.shape[1]
    if g == h:
        return attend(q, k, v, mask, scale, explicit_grad=False)
    rep = h // g
    out = attend(q.reshape(b, g, rep * t, d), k, v, mask, scale, explicit_grad=False)  # (B, rep * T, g * d)
    return out.view(b, rep, t, g, d).permute(0, 2, 3, 1, 4).reshape(b, t, h * d)


def tile_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """``(B, 1, T, S) -> (B, 1, rep * T, S)``: the mask of :func:`gqa_attend`'s folded queries (row ``r * T + t`` is
    row ``t``); unchanged for ``rep == 1`` or a single query, which broadcasts."""
    if rep == 1 or mask.shape[2] == 1:
        return mask
    return mask.repeat(1, 1, rep, 1)


class FastLlama(FastBase):
    """``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` (see the module docstring)."""

    arch = "llama"

    def __init__(self, model: Any, adapter: str = "default") -> None:
        super().__init__(model, adapter)
        base = model.get_base_model()
        cfg = base.config
        self.arch = str(cfg.model_type)
        layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise Unsupported(f"sliding-window attention (layer_types {sorted(layer_types)})")
        if type(base).__name__ == "MistralForCausalLM" and getattr(cfg, "sliding_window", None) is not None:
            raise Unsupported(f"sliding-window attention (sliding_window={cfg.sliding_window})")
        if cfg.hidden_act not in MLP_ACTS:
            raise Unsupported(f"hidden_act '{cfg.hidden_act}'")
        self.act = MLP_ACTS[cfg.hidden_act]
        inner = base.model
        rot = inner.rotary_emb
        if rot.rope_type not in ROPE_TYPES:
            raise Unsupported(f"RoPE scaling '{rot.rope_type}' (supported: {', '.join(ROPE_TYPES)})")
        self.inv_freq, self.rope_scaling = rot.inv_freq, float(rot.attention_scaling)
        self.embed = inner.embed_tokens.weight
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.d = int(cfg.hidden_size)
        self.eps = float(cfg.rms_norm_eps)
        self.blocks: list[_LlamaBlock] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            if layer.input_layernorm.weight.shape != (self.d,):
                raise Unsupported("a norm other than RMSNorm over hidden_size")
            self.blocks.append(_LlamaBlock(
                layer.input_layernorm.weight, *(wrap(getattr(a, n), adapter) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                layer.post_attention_layernorm.weight, *(wrap(getattr(m, n), adapter) for n in ("gate_proj", "up_proj", "down_proj")),
                float(a.scaling),
            ))
        self.head_dim = int(inner.layers[0].self_attn.head_dim)
        self.norm = inner.norm.weight
        self.lm_head = wrap(base.lm_head, adapter)
        if self.lm_head.a is not None:
            raise Unsupported("LoRA on lm_head")

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.d,), w, self.eps)

    def _hidden(
        self, ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, lora: bool,
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None, start: int = 0, keep: slice | None = None,
    ) -> torch.Tensor:
        """``ids (B, T), rope = cos, sin (B, 1, T, d_head), mask (B, 1, T, S)`` additive ``-> final hidden state
        (B, T, H)`` (after the final norm). With ``kv``, this call's keys/values are written into the buffers at
        ``[start, start + T)`` and attention runs over ``[0, start + T)`` (``S = start + T``).

        ``keep``: only these positions' hidden states are wanted (``-> (B, len(keep), H)``); the last layer then
        projects keys and values at every position but runs its queries, attention and MLP at the kept positions
        alone (as GPT-2's fast path)."""
        b, t = ids.shape
        nh, g, hd = self.heads, self.kv_heads, self.head_dim
        rep = nh // g
        last = len(self.blocks) - 1
        cos, sin = rope
        x = F.embedding(ids, self.embed)
        tiled = tile_mask(mask, rep)
        for i, blk in enumerate(self.blocks):
            h = self._rms(x, blk.ln1)
            q = rotate(linear(h, blk.q, lora).view(b, t, nh, hd).transpose(1, 2), cos, sin)
            k = rotate(linear(h, blk.k, lora).view(b, t, g, hd).transpose(1, 2), cos, sin)
            v = linear(h, blk.v, lora).view(b, t, g, hd).transpose(1, 2)
            if kv is not None:
                kb, vb = kv[i]
                kb[:, :, start : start + t] = k
                vb[:, :, start : start + t] = v
                k, v = kb[:, :, : start + t], vb[:, :, : start + t]
            if i == last and keep is not None:
                x, q, tiled = x[:, keep], q[:, :, keep], tile_mask(mask[:, :, keep], rep)
            x = x + linear(gqa_attend(q, k, v, tiled, blk.scale), blk.o, lora)
            h = self._rms(x, blk.ln2)
            x = x + linear(self.act(linear(h, blk.gate, lora)) * linear(h, blk.up, lora), blk.down, lora)
        return self._rms(x, self.norm)

    def forward_causal(
        self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, tq: int, tr: int, want_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ids, mask, position_ids (B, Tq + Tr) -> logits (B, Tr, V), hidden (B, Tr, H) or None``: the positions
        ``tq - 1 .. tq + tr - 2`` that predict the response tokens (what ``Policy._run`` returns)."""
        lora = self.lora_on()
        allowed = causal_mask(mask.bool(), ids.shape[1])
        rope = rope_tables(position_ids, self.inv_freq, self.rope_scaling)
        hidden = self._hidden(ids, rope, additive_mask(allowed, self.embed.dtype), lora, keep=slice(tq - 1, tq - 1 + tr))
        logits = linear(hidden, self.lm_head, False)
        return logits, hidden if want_hidden else None

    def decode_steps(self, query_ids: torch.Tensor, query_mask: torch.Tensor, n_new: int) -> Decode:
        """The generator of ``Policy._decode_steps`` for left-padded causal queries: positions count real tokens,
        generated tokens always attend (as the HF path); cos/sin of every generated position built once."""
        lora = self.lora_on()
        b, tq = query_ids.shape
        total, dt = tq + n_new, self.embed.dtype
        kv = [(query_ids.new_empty((b, self.kv_heads, total, self.head_dim), dtype=dt),
               query_ids.new_empty((b, self.kv_heads, total, self.head_dim), dtype=dt)) for _ in self.blocks]
        valid = torch.cat([query_mask.bool(), query_mask.new_ones((b, n_new), dtype=torch.bool)], dim=1)
        position = (query_mask.long().cumsum(1) - 1).clamp(min=0)
        prefill_mask = additive_mask(causal_mask(valid[:, :tq], tq), dt)
        rope = rope_tables(position, self.inv_freq, self.rope_scaling)
        hidden = self._hidden(query_ids, rope, prefill_mask, lora, kv, 0, keep=slice(tq - 1, tq))[:, -1]
        step_mask = additive_mask(valid[:, None, None, :], dt)  # (B, 1, 1, total), sliced to the filled length
        ahead = position[:, -1:] + torch.arange(1, n_new + 1, device=position.device)  # (B, n_new)
        cos, sin = rope_tables(ahead, self.inv_freq, self.rope_scaling)
        for t in range(n_new):
            token = yield linear(hidden, self.lm_head, False), hidden
            cur = tq + t
            step_rope = (cos[:, :, t : t + 1], sin[:, :, t : t + 1])
            hidden = self._hidden(token.unsqueeze(1), step_rope, step_mask[..., : cur + 1], lora, kv, cur)[:, -1]

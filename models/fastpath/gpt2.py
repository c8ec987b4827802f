"""The fast path for GPT-2 (``GPT2LMHeadModel``): the training / reference forward over a left-padded
``query + response`` batch and incremental decoding with preallocated K/V buffers (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from detoxflow.models.fastpath.common import (
    ACTS,
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


@dataclass
class _GPT2Block:
    ln1: tuple[torch.Tensor, torch.Tensor]
    c_attn: Linear
    attn_proj: Linear
    ln2: tuple[torch.Tensor, torch.Tensor]
    c_fc: Linear
    mlp_proj: Linear
    scale: float


class FastGPT2(FastBase):
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
        if cfg.activation_function not in ACTS:
            raise Unsupported(f"activation_function '{cfg.activation_function}'")
        self.act = ACTS[cfg.activation_function]
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
                (blk.ln_1.weight, blk.ln_1.bias), wrap(blk.attn.c_attn, adapter), wrap(blk.attn.c_proj, adapter),
                (blk.ln_2.weight, blk.ln_2.bias), wrap(blk.mlp.c_fc, adapter), wrap(blk.mlp.c_proj, adapter), scale,
            ))
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.lm_head = wrap(base.lm_head, adapter)
        if self.lm_head.a is not None:
            raise Unsupported("LoRA on lm_head")

    def _hidden(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, lora: bool,
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
            q, k, v = linear(h, blk.c_attn, lora).view(b, t, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
            if kv is not None:
                kb, vb = kv[i]
                kb[:, :, start : start + t] = k
                vb[:, :, start : start + t] = v
                k, v = kb[:, :, : start + t], vb[:, :, : start + t]
            if i == last and keep is not None:
                x, q, mask = x[:, keep], q[:, :, keep], mask[:, :, keep]
            x = x + linear(attend(q, k, v, mask, blk.scale, explicit_grad=False), blk.attn_proj, lora)
            h = F.layer_norm(x, (d,), blk.ln2[0], blk.ln2[1], self.eps)
            x = x + linear(self.act(linear(h, blk.c_fc, lora)), blk.mlp_proj, lora)
        return F.layer_norm(x, (d,), self.ln_f[0], self.ln_f[1], self.eps)

    def forward_causal(
        self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, tq: int, tr: int, want_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ids, mask, position_ids (B, Tq + Tr) -> logits (B, Tr, V), hidden (B, Tr, H) or None``: the positions
        ``tq - 1 .. tq + tr - 2`` that predict the response tokens (what ``Policy._run`` returns)."""
        lora = self.lora_on()
        allowed = causal_mask(mask.bool(), ids.shape[1])
        hidden = self._hidden(ids, position_ids, additive_mask(allowed, self.wte.dtype), lora,
                              keep=slice(tq - 1, tq - 1 + tr))
        logits = linear(hidden, self.lm_head, False)
        return logits, hidden if want_hidden else None

    def decode_steps(self, query_ids: torch.Tensor, query_mask: torch.Tensor, n_new: int) -> Decode:
        """The generator of ``Policy._decode_steps`` for left-padded causal queries: positions count real tokens,
        generated tokens always attend (as the HF path)."""
        lora = self.lora_on()
        b, tq = query_ids.shape
        total, nh = tq + n_new, self.heads
        kv = [(query_ids.new_empty((b, nh, total, self.d // nh), dtype=self.wte.dtype),
               query_ids.new_empty((b, nh, total, self.d // nh), dtype=self.wte.dtype)) for _ in self.blocks]
        valid = torch.cat([query_mask.bool(), query_mask.new_ones((b, n_new), dtype=torch.bool)], dim=1)
        position = (query_mask.long().cumsum(1) - 1).clamp(min=0)
        prefill_mask = additive_mask(causal_mask(valid[:, :tq], tq), self.wte.dtype)
        hidden = self._hidden(query_ids, position, prefill_mask, lora, kv, 0, keep=slice(tq - 1, tq))[:, -1]
        # (B, 1, 1, total): one query row, sliced to the filled length
        step_mask = additive_mask(valid[:, None, None, :], self.wte.dtype)
        position = position[:, -1:]
        for t in range(n_new):
            token = yield linear(hidden, self.lm_head, False), hidden
            position = position + 1
            cur = tq + t
            hidden = self._hidden(token.unsqueeze(1), position, step_mask[..., : cur + 1], lora, kv, cur)[:, -1]

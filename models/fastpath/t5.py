"""The fast path for T5 (``T5ForConditionalGeneration``): the encoder, the training / reference decoder forward
and incremental decoding with the encoder output, cross-attention K/V and relative position bias built once per
rollout (see the package docstring)."""

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


class FastT5(FastBase):
    """``T5ForConditionalGeneration`` (relu or gated activations, relative position bias in the first layer of
    each stack, decoder output rescaled by ``d_model ** -0.5`` when the config says so)."""

    arch = "t5"

    def __init__(self, model: Any, adapter: str = "default") -> None:
        super().__init__(model, adapter)
        base = model.get_base_model()
        cfg = base.config
        act = getattr(cfg, "dense_act_fn", None)
        if act not in ACTS:
            raise Unsupported(f"dense_act_fn '{act}'")
        self.act = ACTS[act]
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
        self.lm_head = wrap(base.lm_head, adapter)
        if self.lm_head.a is not None:
            raise Unsupported("LoRA on lm_head")

    @staticmethod
    def _block(block: Any, adapter: str, decoder: bool) -> _T5Block:
        def attn(layer: Any, mod: Any) -> _T5Attn:
            return _T5Attn(layer.layer_norm.weight, *(wrap(getattr(mod, n), adapter) for n in ("q", "k", "v", "o")))

        sa = attn(block.layer[0], block.layer[0].SelfAttention)
        cross = attn(block.layer[1], block.layer[1].EncDecAttention) if decoder else None
        ff_layer = block.layer[2 if decoder else 1]
        dense = ff_layer.DenseReluDense
        gated = hasattr(dense, "wi_0")
        return _T5Block(sa, cross, ff_layer.layer_norm.weight, None if gated else wrap(dense.wi, adapter),
                        wrap(dense.wi_0, adapter) if gated else None, wrap(dense.wi_1, adapter) if gated else None,
                        wrap(dense.wo, adapter))

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.d,), w, self.eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, h * d_kv) -> (B, h, T, d_kv)``"""
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def _ff(self, x: torch.Tensor, blk: _T5Block, lora: bool) -> torch.Tensor:
        h = self._norm(x, blk.ff_ln)
        if blk.wi is not None:
            h = self.act(linear(h, blk.wi, lora))
        else:
            h = self.act(linear(h, blk.wi_0, lora)) * linear(h, blk.wi_1, lora)
        return x + linear(h, blk.wo, lora)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, lora: bool) -> torch.Tensor:
        """``ids, mask (B, Ts) -> encoder output (B, Ts, d)`` (after the final norm)."""
        t = ids.shape[1]
        bias = relative_position_bias(self.enc_rel, self.attn_cls, t, t, True, self.buckets, self.max_distance)
        bias = _additive(bias, mask.bool()[:, None, None, :])
        x = F.embedding(ids, self.enc_embed)
        for blk in self.enc_blocks:
            a = blk.self_attn
            h = self._norm(x, a.ln)
            q, k, v = (self._heads(linear(h, lin, lora)) for lin in (a.q, a.k, a.v))
            x = x + linear(attend(q, k, v, bias, 1.0), a.o, lora)
            x = self._ff(x, blk, lora)
        return self._norm(x, self.enc_ln)

    def _cross_kv(self, enc: torch.Tensor, lora: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention ``(K, V)`` per decoder layer, ``(B, h, Ts, d_kv)`` each, contiguous: they are read once per
        generated token, and SDPA on the transposed views costs ~1.5x as much (measured at B 16, Ts 64)."""
        return [(self._heads(linear(enc, b.cross.k, lora)).contiguous(),
                 self._heads(linear(enc, b.cross.v, lora)).contiguous()) for b in self.dec_blocks]

    def _decoder_layer(
        self, x: torch.Tensor, blk: _T5Block, self_bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None,
        cross_in: torch.Tensor | tuple[torch.Tensor, torch.Tensor], cross_mask: torch.Tensor, lora: bool,
        start: int,
    ) -> torch.Tensor:
        """One decoder block. ``kv``: self-attention buffers written at ``[start, start + T)``, attention over
        ``[0, start + T)``; ``cross_in``: the encoder output (K/V projected here, in HF's op order: q
        first) or the ``(K, V)`` projected once per rollout."""
        a, c = blk.self_attn, blk.cross
        t = x.shape[1]
        h = self._norm(x, a.ln)
        q, k, v = (self._heads(linear(h, lin, lora)) for lin in (a.q, a.k, a.v))
        if kv is not None:
            kv[0][:, :, start : start + t] = k
            kv[1][:, :, start : start + t] = v
            k, v = kv[0][:, :, : start + t], kv[1][:, :, : start + t]
        x = x + linear(attend(q, k, v, self_bias, 1.0), a.o, lora)
        h = self._norm(x, c.ln)
        q = self._heads(linear(h, c.q, lora))
        if isinstance(cross_in, tuple):
            k, v = cross_in
        else:
            k, v = self._heads(linear(cross_in, c.k, lora)), self._heads(linear(cross_in, c.v, lora))
        x = x + linear(attend(q, k, v, cross_mask, 1.0, explicit_grad=False), c.o, lora)
        return self._ff(x, blk, lora)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden * self.scale_out if self.scale_out is not None else hidden, self.lm_head, False)

    def forward_seq2seq(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor, want_hidden: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``-> logits (B, Td, V), decoder last hidden state (B, Td, d) or None`` (what ``Policy._run`` returns)."""
        lora = self.lora_on()
        enc = self.encode(input_ids, attention_mask, lora)
        td = decoder_input_ids.shape[1]
        self_bias = relative_position_bias(self.dec_rel, self.attn_cls, td, td, False, self.buckets, self.max_distance)
        self_bias = _additive(self_bias, causal_mask(decoder_attention_mask.bool(), td))
        cross_mask = additive_mask(attention_mask.bool()[:, None, None, :], enc.dtype)
        x = F.embedding(decoder_input_ids, self.dec_embed)
        for blk in self.dec_blocks:
            x = self._decoder_layer(x, blk, self_bias, None, enc, cross_mask, lora, 0)
        hidden = self._norm(x, self.dec_ln)
        return self._head(hidden), hidden if want_hidden else None

    def decode_steps(self, query_ids: torch.Tensor, query_mask: torch.Tensor, n_new: int, start_token: int) -> Decode:
        """The generator of ``Policy._decode_steps``: the encoder and the cross-attention K/V once, then one decoder
        position per call with self-attention K/V in static buffers and the causal position bias built once."""
        lora = self.lora_on()
        b = query_ids.shape[0]
        enc = self.encode(query_ids, query_mask, lora)
        cross = self._cross_kv(enc, lora)
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
                x = self._decoder_layer(x, blk, step_bias, buf, ckv, cross_mask, lora, t)
            hidden = self._norm(x, self.dec_ln)[:, -1]
            token = yield self._head(hidden), hidden

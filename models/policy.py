"""The policy: a base LM (seq2seq or causal) + a trainable LoRA adapter + a value head, behind one interface:
tokens in and out (encode, decode), the forwards (adapter on, with values; adapter off, the reference), the
trainable state, and the entry points of its two neighbours, which hold the rest:

- :mod:`detoxflow.models.artifact`: loading (from config or a saved artifact), saving, the SFT merge;
- :mod:`detoxflow.models.sampling`: the sampler (rollout, sampling transforms, the LoRA merge for sampling).

The reference model of the KL penalty is the same module with the adapter disabled - the same weights in
memory, never a second copy. A supervised (SFT) adapter, if configured, is merged into the base before the PPO
adapter is added, so "adapter off" means "the SFT policy", which is what the KL must be measured against.

Shapes (docs/architecture.md): ``query_ids / query_mask (B, Tq)``, ``response_ids / response_mask (B, Tr)``,
``response_mask`` true on real response tokens up to and including the first EOS.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models import artifact, sampling
from detoxflow.models import prompts as prompts_mod
from detoxflow.models.artifact import ARTIFACT_META, PolicyError
from detoxflow.models.fastpath.common import dropouts
from detoxflow.models.ppo import entropy_from_logits, logprobs_from_logits
from detoxflow.models.sampling import (
    Rollout,
    SampledFrom,
    categorical,
    response_mask_from_eos,
    sample_token,
    trim_padding,
)

log = logging.getLogger(__name__)

# defined with the code they belong to, importable from here as before
__all__ = ["ARTIFACT_META", "Policy", "PolicyError", "Rollout", "SampledFrom", "categorical", "response_mask_from_eos",
           "sample_token"]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PolicyError("model.device is 'cuda' but no CUDA device is visible; set model.device=cpu or auto")
    return torch.device(name)


def _disable_dropout(model: nn.Module) -> None:
    """Zero every dropout, LoRA's included: PPO's ratio compares the training forward with the rollout that drew
    the tokens, and its KL compares both with the reference pass; with dropout in one pass only, the ratio is not 1
    before an update and the clip range fires on noise. No pass of the policy uses dropout, so ``lora.dropout``
    is recorded in the adapter's PEFT config but never applied here.

    Besides ``nn.Dropout`` modules, some attentions keep their attention-probability dropout as a plain float read
    in train mode (T5Attention.dropout = config.dropout_rate, 0.1 in t5-small / flan-t5; Llama's
    attention_dropout): those are zeroed too."""
    for _, module, attr, _ in dropouts(model):
        setattr(module, attr, 0.0)


@dataclass
class Policy:
    """Base LM + LoRA adapter "default" (trainable) + value head; see the module docstring."""

    model: Any  # peft.PeftModel
    value_head: nn.Linear
    tokenizer: Any
    is_seq2seq: bool
    device: torch.device
    base_source: dict[str, Any] = field(default_factory=dict)  # {"hub_id", "revision"} or {"local": dir}
    sft_adapter: str | None = None
    lora_settings: dict[str, Any] = field(default_factory=dict)
    fast: Any = None  # models.fastpath.FastGPT2 / FastT5, or None: the HF module path

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, model_cfg: ModelConfig, lora_cfg: LoraSection) -> Policy:
        """Build the policy from config: resolve the base, merge the SFT adapter if any, add a fresh LoRA adapter."""
        return cls._assemble(artifact.load_from_config(model_cfg, lora_cfg), model_cfg.device, model_cfg.fast_path)

    @classmethod
    def from_artifact(
        cls, path: str | os.PathLike[str], trainable: bool = False, device: str = "auto", fast_path: str = "auto"
    ) -> Policy:
        """Load a saved model artifact (see :meth:`save_artifact`)."""
        return cls._assemble(artifact.load_artifact(path, trainable), device, fast_path)

    @classmethod
    def _assemble(cls, parts: artifact.Loaded, device: str, fast_path: str = "auto") -> Policy:
        """Put the loaded parts on ``device``: every dropout off, the value head (zero-initialised, or the saved
        weights), eval mode, the forward path chosen."""
        model = parts.model
        dev = _resolve_device(device)
        _disable_dropout(model)
        hidden = model.get_base_model().config.get_text_config(decoder=True).hidden_size
        # zero init: the first value estimates are 0 instead of noise that the first advantages would inherit
        value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        if parts.value_state is not None:
            value_head.load_state_dict(parts.value_state)
        model.to(dev)
        model.eval()
        fast = _select_fast_path(model, fast_path)
        return cls(model, value_head.to(dev), parts.tokenizer, parts.is_seq2seq, dev, parts.base_source,
                   parts.sft_adapter, parts.lora_settings, fast)

    # ------------------------------------------------------------------------------------------ artifact

    def save_artifact(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write the model artifact atomically: adapter/, value_head.pt, tokenizer/, base/ (local bases),
        sft_adapter/ (if one was merged), detoxflow.json (arch, base, lora, plus ``extra``: config, metrics)."""
        return artifact.save_artifact(self, path, extra)

    # ------------------------------------------------------------------------------------------ state

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights and the value head: all that PPO updates (the base stays frozen)."""
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def trainable_state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        head = {k: v.detach().cpu().clone() for k, v in self.value_head.state_dict().items()}
        return {"adapter": adapter, "value_head": head}

    def load_trainable_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state["adapter"])
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise PolicyError(f"checkpoint adapter does not fit this model: unexpected keys {unexpected[:3]}...")
        self.value_head.load_state_dict(state["value_head"])

    def set_train(self, mode: bool) -> None:
        """Train mode changes no pass (every dropout is off, see _disable_dropout); kept for modules that read it. Does nothing
        when the model is already in that mode: ``train()`` walks every module (~2 ms at tiny sizes)."""
        if self.model.training != mode:
            self.model.train(mode)

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The reference model: this policy with its adapter off (through the fast path's own switch when it serves
        the passes, else PEFT's ``disable_adapter()``)."""
        with self.fast.adapter_off() if self.fast is not None else self.model.disable_adapter():
            yield

    # ------------------------------------------------------------------------------------------ tokens

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode_queries(
        self, prompts: Sequence[str], max_tokens: int, tail: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts: ``-> query_ids (B, Tq), query_mask (B, Tq)``; right-padded for seq2seq, left for causal
        (so that every causal row ends where its response starts). ``tail``: a prompt over ``max_tokens`` keeps
        its start and the tokens of ``tail`` at its end, cutting the middle (``detoxflow.models.prompts``); None:
        the tokenizer's own truncation side."""
        if tail is not None:
            enc = prompts_mod.encode(self.tokenizer, prompts, max_tokens, tail)
            return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        enc = self.tokenizer(
            list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
            return_token_type_ids=False,
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """``(B, Tr), (B, Tr) -> B`` strings, special tokens dropped."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(response_ids.cpu(), response_mask.cpu())]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------ generation

    def generate(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_cfg: GenerationConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched sampling with the KV cache and the adapter on: ``-> response_ids (B, Tr), response_mask (B, Tr)``.

        The same loop as :meth:`rollout`, without its per-token statistics."""
        out = self.rollout(query_ids, query_mask, gen_cfg, with_stats=False)
        return out.response_ids, out.response_mask

    def rollout(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_cfg: GenerationConfig, with_stats: bool = True
    ) -> Rollout:
        """Sample responses and, from the same decoder passes, the behaviour policy's ``logprobs``, ``values`` and
        ``entropy`` of every sampled token: see :func:`detoxflow.models.sampling.rollout`."""
        return sampling.rollout(self, query_ids, query_mask, gen_cfg, with_stats)

    def _decode_steps(
        self, base: Any, query_ids: torch.Tensor, query_mask: torch.Tensor, n_new: int
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, None]:
        """Incremental decoding as a generator: yields ``(logits (B, V), last hidden state (B, H))`` of the next
        position; is sent the ``(B,)`` tokens chosen there. The positions and masks are those :meth:`_run` uses, so
        the logits equal the full forward's."""
        if self.fast is not None:
            if self.is_seq2seq:
                yield from self.fast.decode_steps(query_ids, query_mask, n_new, self._decoder_start_token_id)
            else:
                yield from self.fast.decode_steps(query_ids, query_mask, n_new)
            return
        if self.is_seq2seq:
            enc = base.get_encoder()(input_ids=query_ids, attention_mask=query_mask)
            token = torch.full_like(query_ids[:, :1], self._decoder_start_token_id)
            cache = None
            while True:
                out = base(encoder_outputs=enc, attention_mask=query_mask, decoder_input_ids=token, cache=cache,
                           use_cache=True, output_hidden_states=True)
                cache = out.cache
                token = (yield out.logits[:, -1], out.decoder_hidden_states[-1][:, -1]).unsqueeze(1)
        # causal: left-padded queries; positions count real tokens (as _run), generated tokens always attend
        tq = query_ids.shape[1]
        mask = torch.cat([query_mask.long(), query_mask.new_ones((query_ids.shape[0], n_new), dtype=torch.long)], 1)
        position = (query_mask.long().cumsum(1) - 1).clamp(min=0)
        out = base(input_ids=query_ids, attention_mask=query_mask, position_ids=position, use_cache=True,
                   output_hidden_states=True, logits_to_keep=1)
        position = position[:, -1:]
        for t in range(n_new):
            token = (yield out.logits[:, -1], out.hidden_states[-1][:, -1]).unsqueeze(1)
            position = position + 1
            out = base(input_ids=token, attention_mask=mask[:, : tq + t + 1], position_ids=position, cache=out.cache,
                       use_cache=True, output_hidden_states=True)

    def generate_texts(
        self, prompts: Sequence[str], gen_cfg: GenerationConfig, batch_size: int = 16, max_query_tokens: int = 512,
        tail: str | None = None,
    ) -> list[str]:
        """Prompts in, decoded responses out, in order; for evaluation and the CLI (``tail``: see encode_queries)."""
        texts: list[str] = []
        for i in range(0, len(prompts), batch_size):
            q, qm = self.encode_queries(prompts[i : i + batch_size], max_query_tokens, tail)
            r, rm = self.generate(q, qm, gen_cfg)
            texts.extend(self.decode(r, rm))
        return texts

    @property
    def _decoder_start_token_id(self) -> int:
        cfg = self.model.get_base_model().config
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = self.pad_token_id
        return int(start)

    # ------------------------------------------------------------------------------------------ forwards

    def _run(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        want_hidden: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One forward: ``-> logits (B, Tr', V), last hidden state (B, Tr', H) or None, Tr'`` where position t
        predicts response token t and Tr' <= Tr drops the columns that are padding in every row."""
        query_ids, query_mask = trim_padding(query_ids, query_mask)
        tr = int(response_mask.bool().any(dim=0).nonzero().max()) + 1 if bool(response_mask.any()) else 1
        response_ids, response_mask = response_ids[:, :tr], response_mask[:, :tr].long()
        if self.is_seq2seq:
            start = torch.full_like(response_ids[:, :1], self._decoder_start_token_id)
            if self.fast is not None:
                logits, hidden = self.fast.forward_seq2seq(
                    query_ids, query_mask, torch.cat([start, response_ids[:, :-1]], dim=1),
                    torch.cat([torch.ones_like(start), response_mask[:, :-1]], dim=1), want_hidden,
                )
                return logits, hidden, tr
            out = self.model(
                input_ids=query_ids,
                attention_mask=query_mask,
                decoder_input_ids=torch.cat([start, response_ids[:, :-1]], dim=1),
                decoder_attention_mask=torch.cat([torch.ones_like(start), response_mask[:, :-1]], dim=1),
                output_hidden_states=want_hidden,
                use_cache=False,
            )
            hidden = out.decoder_hidden_states[-1] if want_hidden else None
            return out.logits, hidden, tr
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask.long(), response_mask], dim=1)
        # the same positions generate() used for left-padded rows (cumsum of the mask), or logprobs would drift
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        tq = query_ids.shape[1]
        if self.fast is not None:
            logits, hidden = self.fast.forward_causal(ids, mask, position_ids, tq, tr, want_hidden)
            return logits, hidden, tr
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            output_hidden_states=want_hidden,
            use_cache=False,
            logits_to_keep=tr + 1,  # only the positions that predict response tokens go through the LM head
        )
        hidden = out.hidden_states[-1][:, tq - 1 : tq - 1 + tr] if want_hidden else None
        return out.logits[:, :-1], hidden, tr

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        with_entropy: bool = True,
        temperature: float = 1.0,
        sampled_from: SampledFrom | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Adapter on: ``-> logprobs (B, Tr), values (B, Tr), entropy (B, Tr) or None``, all from ONE forward
        (the value head reads the last hidden state of the decoder). Zero outside the response mask.
        ``temperature`` and ``sampled_from`` (the rollout's filter, these rows): score the tokens under the
        distribution they were drawn from, as the rollout did."""
        logits, hidden, tr = self._run(query_ids, query_mask, response_ids, response_mask, want_hidden=True)
        logits = _as_sampled(logits, temperature, sampled_from)
        logprobs = logprobs_from_logits(logits, response_ids[:, :tr])
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        entropy = entropy_from_logits(logits) if with_entropy else None
        full = response_ids.shape[1]
        mask = response_mask.to(logprobs.dtype)
        logprobs, values = _pad_to(logprobs, full) * mask, _pad_to(values, full) * mask
        if entropy is not None:
            entropy = _pad_to(entropy, full) * mask
        return logprobs, values, entropy

    def ref_logprobs(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        sampled_from: SampledFrom | None = None,
    ) -> torch.Tensor:
        """Reference logprobs ``(B, Tr)``: the same model with the adapter disabled (the base, or the merged SFT
        policy), no gradient. With the policy's ``sampled_from``: the reference renormalised over the tokens the
        policy's sampler could draw (its kept set, not one the reference would pick: a token the policy drew
        outside the reference's own top-k would get log 0 = -inf)."""
        with torch.no_grad(), self.adapter_disabled():
            logits, _, tr = self._run(query_ids, query_mask, response_ids, response_mask, want_hidden=False)
            logits = _as_sampled(logits, temperature, sampled_from)
            logprobs = logprobs_from_logits(logits, response_ids[:, :tr])
        return _pad_to(logprobs, response_ids.shape[1]) * response_mask.to(logprobs.dtype)


def _select_fast_path(model: Any, setting: str) -> Any:
    """``model.fast_path``: 'auto' uses the functional forward of models/fastpath/ where it implements the model,
    else the HF modules; 'off' always the HF modules. Logged once per policy."""
    if setting == "off":
        log.info("forward path: HF modules (model.fast_path=off)")
        return None
    if setting != "auto":
        raise PolicyError(f"model.fast_path '{setting}': use 'auto' or 'off'")
    from detoxflow.models.fastpath import build

    fast, reason = build(model)
    if fast is None:
        log.info("forward path: HF modules (%s)", reason)
    else:
        log.info("forward path: fast path (%s)", reason)
    return fast


def _as_sampled(logits: torch.Tensor, temperature: float, sampled_from: SampledFrom | None) -> torch.Tensor:
    """``(B, Tr', V) -> (B, Tr', V)``: temperature-scaled, then the sampler's filter when given."""
    if temperature != 1.0:
        logits = logits / temperature
    return logits if sampled_from is None else sampled_from.apply(logits)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad ``(B, T')`` with zeros to ``(B, length)``."""
    if x.shape[1] == length:
        return x
    return torch.nn.functional.pad(x, (0, length - x.shape[1]))


"""The policy: a base LM (seq2seq or causal) + a trainable LoRA adapter + a value head, behind one interface.

The reference model of the KL penalty is the same module with the adapter disabled - the same weights in
memory, never a second copy. A supervised (SFT) adapter, if configured, is merged into the base before the PPO
adapter is added, so "adapter off" means "the SFT policy", which is what the KL must be measured against.

Shapes (docs/architecture.md): ``query_ids / query_mask (B, Tq)``, ``response_ids / response_mask (B, Tr)``,
``response_mask`` true on real response tokens up to and including the first EOS.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detoxflow.atomic import atomic_dir
from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models.ppo import entropy_from_logits, logprobs_from_logits

log = logging.getLogger(__name__)

ARTIFACT_META = "detoxflow.json"

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


# Merging the LoRA for sampling saves per-op overhead, which dominates only while the matrices are small (tiny
# models: rollout -5 to -17%); it costs a transient copy of the targeted weights, which grows with the model
# (small GPT-2: 85 MB) while the LoRA matmuls it saves shrink to ~3% of those layers' FLOPs. Merge only while the
# copy is at most this large.
MERGE_LORA_MAX_BYTES = 16 * 2**20


class PolicyError(RuntimeError):
    """A model that cannot be used as a policy; the message names it and the fix."""


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


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B, Tr) -> (B, Tr)`` bool: true up to and including the first EOS of each row (all true if none)."""
    is_eos = response_ids == eos_token_id
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return seen_before == 0


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PolicyError("model.device is 'cuda' but no CUDA device is visible; set model.device=cpu or auto")
    return torch.device(name)


def _resolve_source(name_or_path: str) -> str:
    """embedded:* -> the built directory (bootstrap, imported lazily: it is heavy); anything else unchanged."""
    if name_or_path.startswith("embedded:"):
        from detoxflow.models.bootstrap import resolve_model

        return str(resolve_model(name_or_path))
    return name_or_path


def _disable_base_dropout(model: nn.Module) -> None:
    """Zero every dropout except LoRA's: PPO ratios compare two forwards of the same policy, which must agree.

    Besides ``nn.Dropout`` modules, some attentions keep their attention-probability dropout as a plain float read
    in train mode (T5Attention.dropout = config.dropout_rate, 0.1 in t5-small / flan-t5; Llama's
    attention_dropout): without zeroing those, T5's training forward dropped attention weights that the rollout
    and the reference forward did not."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0:
                setattr(module, attr, 0.0)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row (either side): ``(B, T) -> (B, T')``."""
    keep = mask.bool().any(dim=0)
    if bool(keep.all()):
        return ids, mask
    return ids[:, keep], mask[:, keep]


@dataclass
class Rollout:
    """One batched sampling pass: ``response_ids``, ``response_mask (B, Tr)`` and, unless skipped, the behaviour
    policy's ``logprobs``, ``values``, ``entropy (B, Tr)`` of the sampled tokens (zero outside the mask)."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def sample_token(
    logits: torch.Tensor, do_sample: bool, top_k: int = 0, top_p: float = 1.0, ban: int | None = None
) -> torch.Tensor:
    """Next tokens from temperature-scaled ``logits (B, V) -> (B,)``: multinomial after top-k / top-p filtering
    (HF's order and tie rules), or argmax when ``do_sample`` is false; token ``ban`` (EOS before min_new_tokens)
    is never chosen."""
    if ban is not None:
        logits = logits.clone()
        logits[:, ban] = -math.inf
    if not do_sample:
        return logits.argmax(dim=-1)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -math.inf)
    return categorical(logits.softmax(dim=-1))


def categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``probs (B, V) -> (B,)`` by inverse CDF: one uniform per row against the cumulative
    sum. The same distribution as ``torch.multinomial(probs, 1)``, whose CPU kernel draws one exponential per
    vocabulary entry (0.8-0.9 ms for 16 x 2000, vs ~0.05 ms here: ~27 ms of a tiny model's 32-token rollout), but
    a different random stream, so a seed gives other samples than before. A token with probability 0 (filtered,
    banned) is never drawn: it adds nothing to the CDF, and the one way to land on it - ``u`` rounding up to the
    total - falls back to the row's most likely token."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    ok = probs.gather(1, idx) > 0
    return torch.where(ok, idx, probs.argmax(dim=-1, keepdim=True)).squeeze(1)


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
        return cls._assemble(model, tokenizer, is_seq2seq, model_cfg.device, base_source, model_cfg.sft_adapter, settings,
                             None, model_cfg.fast_path)

    @classmethod
    def from_artifact(
        cls, path: str | os.PathLike[str], trainable: bool = False, device: str = "auto", fast_path: str = "auto"
    ) -> Policy:
        """Load a saved model artifact (see :meth:`save_artifact`)."""
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
        return cls._assemble(
            model, tokenizer, is_seq2seq, device, base_source, str(sft) if sft.is_dir() else None,
            meta.get("lora", {}), value_state, fast_path,
        )

    @classmethod
    def _assemble(
        cls,
        model: Any,
        tokenizer: Any,
        is_seq2seq: bool,
        device: str,
        base_source: dict[str, Any],
        sft_adapter: str | None,
        lora_settings: dict[str, Any],
        value_state: dict[str, torch.Tensor] | None,
        fast_path: str = "auto",
    ) -> Policy:
        dev = _resolve_device(device)
        _disable_base_dropout(model)
        hidden = model.get_base_model().config.get_text_config(decoder=True).hidden_size
        # zero init: the first value estimates are 0 instead of noise that the first advantages would inherit
        value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        if value_state is not None:
            value_head.load_state_dict(value_state)
        model.to(dev)
        model.eval()
        fast = _select_fast_path(model, fast_path)
        return cls(model, value_head.to(dev), tokenizer, is_seq2seq, dev, base_source, sft_adapter, lora_settings, fast)

    # ------------------------------------------------------------------------------------------ artifact

    def save_artifact(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write the model artifact atomically: adapter/, value_head.pt, tokenizer/, base/ (local bases),
        sft_adapter/ (if one was merged), detoxflow.json (arch, base, lora, plus ``extra``: config, metrics)."""
        dest = Path(path)
        with atomic_dir(dest) as tmp:
            self.model.save_pretrained(str(tmp / "adapter"))
            torch.save({k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}, tmp / "value_head.pt")
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            base_meta: dict[str, Any]
            if "local" in self.base_source:
                shutil.copytree(self.base_source["local"], tmp / "base", ignore=shutil.ignore_patterns(".*"))
                base_meta = {"local": "base"}
            else:
                base_meta = {"hub_id": self.base_source["hub_id"], "revision": self.base_source.get("revision")}
            if self.sft_adapter:
                shutil.copytree(self.sft_adapter, tmp / "sft_adapter", ignore=shutil.ignore_patterns(".*"))
            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
            meta = {"arch": "seq2seq" if self.is_seq2seq else "causal", "base": base_meta, "dtype": dtype,
                    "lora": self.lora_settings, **(extra or {})}
            (tmp / ARTIFACT_META).write_text(json.dumps(meta, indent=2, default=str))
        return dest

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
        """Train mode only matters for LoRA dropout (base dropout is off, see _disable_base_dropout). Does nothing
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

    def encode_queries(self, prompts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts: ``-> query_ids (B, Tq), query_mask (B, Tq)``; right-padded for seq2seq, left for causal
        (so that every causal row ends where its response starts)."""
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
        """Sample responses (adapter on, eval mode, KV cache) and, from the same decoder passes, the behaviour
        policy's ``logprobs``, ``values`` and ``entropy`` of every sampled token: what :meth:`forward` would return
        for these responses (equal up to float rounding), without a second forward.

        One ``model(...)`` call per token on the transformers model under the PEFT wrapper (LoRA layers stay in
        place), instead of HF ``generate``: its per-token machinery (logits processors, stopping criteria, input
        preparation) is 30% of its time at tiny sizes, and it cannot hand back the last hidden state the value
        head reads without returning every layer's. With the statistics, this loop takes about the time HF
        ``generate`` takes for the tokens alone (docs/benchmarks.md, section 4). Tokens after the first EOS are the pad id and masked out. Only
        the configured sampling transforms run (temperature, top-k, top-p; EOS banned before ``min_new_tokens``):
        no repetition penalty or n-gram blocking, because PPO's logprobs must be those of the policy.
        """
        query_ids, query_mask = _trim(query_ids, query_mask)
        base = self.model.get_base_model()
        b, n_new = query_ids.shape[0], gen_cfg.max_new_tokens
        eos, pad = self.eos_token_id, self.pad_token_id
        tokens: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []
        step_hidden: list[torch.Tensor] = []
        was_training = self.model.training
        self.set_train(False)
        try:
            with torch.inference_mode(), self._lora_merged():
                step = self._decode_steps(base, query_ids, query_mask, n_new)
                logits, hidden = next(step)
                finished = torch.zeros(b, dtype=torch.bool, device=query_ids.device)
                for t in range(n_new):
                    scaled = logits.float()
                    if gen_cfg.temperature != 1.0:
                        scaled = scaled / gen_cfg.temperature
                    token = sample_token(scaled, gen_cfg.do_sample, gen_cfg.top_k, gen_cfg.top_p,
                                         ban=eos if t < gen_cfg.min_new_tokens else None)
                    token = token.masked_fill(finished, pad)
                    tokens.append(token)
                    if with_stats:  # the statistics are computed once after the loop: fewer small ops
                        step_logits.append(scaled)
                        step_hidden.append(hidden)
                    finished = finished | (token == eos)
                    # one host sync per token, as in HF generate; none while EOS is still banned
                    if t + 1 == n_new or (t + 1 >= gen_cfg.min_new_tokens and bool(finished.all())):
                        break
                    logits, hidden = step.send(token)
                step.close()
        finally:
            self.set_train(was_training)
        # stacked outside inference mode: inference tensors could not be saved for a later backward pass
        response = torch.stack(tokens, dim=1)
        mask = response_mask_from_eos(response, eos)
        response = response.masked_fill(~mask, pad)
        if not with_stats:
            return Rollout(response, mask)
        with torch.no_grad():
            logits = torch.stack(step_logits, dim=1)
            values = self.value_head(torch.stack(step_hidden, dim=1).to(self.value_head.weight.dtype)).squeeze(-1)
            m = mask.to(torch.float32)
            return Rollout(response, mask, logprobs_from_logits(logits, response) * m, values * m,
                           entropy_from_logits(logits) * m)

    @contextmanager
    def _lora_merged(self) -> Iterator[None]:
        """For sampling: the targeted base weights hold ``W + delta`` and the LoRA branches are off, which saves two
        small matmuls and PEFT's per-layer Python in every decoder call (5-17% of the rollout at tiny sizes).

        The merged weights are new tensors swapped in under the same parameters; afterwards the parameters hold
        their original tensors again, bit-identical (PEFT's unmerge subtracts the delta, which does not round-trip
        in floating point). Costs one transient copy of the targeted weights, so it is done only while that copy is
        at most :data:`MERGE_LORA_MAX_BYTES`; above it the LoRA branches run as usual. Only under no_grad."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and not m.merged]
        copy_bytes = sum(m.get_base_layer().weight.nbytes for m in layers)
        if copy_bytes > MERGE_LORA_MAX_BYTES:
            yield
            return
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for module in layers:
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                swapped.append((weight, weight.data))
                weight.data = weight.data + delta
            with self.adapter_disabled():
                yield
        finally:
            for weight, original in swapped:
                weight.data = original

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
        self, prompts: Sequence[str], gen_cfg: GenerationConfig, batch_size: int = 16, max_query_tokens: int = 512
    ) -> list[str]:
        """Prompts in, decoded responses out, in order; for evaluation and the CLI."""
        texts: list[str] = []
        for i in range(0, len(prompts), batch_size):
            q, qm = self.encode_queries(prompts[i : i + batch_size], max_query_tokens)
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
        query_ids, query_mask = _trim(query_ids, query_mask)
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Adapter on: ``-> logprobs (B, Tr), values (B, Tr), entropy (B, Tr) or None``, all from ONE forward
        (the value head reads the last hidden state of the decoder). Zero outside the response mask."""
        logits, hidden, tr = self._run(query_ids, query_mask, response_ids, response_mask, want_hidden=True)
        if temperature != 1.0:
            logits = logits / temperature
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
    ) -> torch.Tensor:
        """Reference logprobs ``(B, Tr)``: the same model with the adapter disabled (the base, or the merged SFT
        policy), no gradient."""
        with torch.no_grad(), self.adapter_disabled():
            logits, _, tr = self._run(query_ids, query_mask, response_ids, response_mask, want_hidden=False)
            if temperature != 1.0:
                logits = logits / temperature
            logprobs = logprobs_from_logits(logits, response_ids[:, :tr])
        return _pad_to(logprobs, response_ids.shape[1]) * response_mask.to(logprobs.dtype)


def _select_fast_path(model: Any, setting: str) -> Any:
    """``model.fast_path``: 'auto' uses the functional forward of models/fastpath.py where it implements the model,
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


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad ``(B, T')`` with zeros to ``(B, length)``."""
    if x.shape[1] == length:
        return x
    return torch.nn.functional.pad(x, (0, length - x.shape[1]))


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

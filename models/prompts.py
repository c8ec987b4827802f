"""Prompts that fit ``data.max_query_tokens``: a visible decision (``data.truncation``), not a silent cut.

``keep_instruction`` cuts an over-long prompt inside the dialogue: it keeps the prompt's first tokens (the
instruction before the dialogue) and its last tokens (the template's text after ``{dialogue}``, e.g.
"Summary:"), so the model still sees what it is asked to do. ``refuse`` stops with one line naming the record.
:func:`check_lengths` counts (and logs) the prompts of a split that are too long before anything runs;
:func:`encode` tokenises a batch; prompts that fit are encoded exactly as the tokenizer always did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from detoxflow.config import DataConfig
from detoxflow.models.data import DataError

logger = logging.getLogger(__name__)


def template_tail(template: str) -> str:
    """The template's text after ``{dialogue}`` (what must survive a cut), e.g. ``"\\n\\nSummary:"``."""
    return template.split("{dialogue}", 1)[1] if "{dialogue}" in template else ""


def _lengths(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def check_lengths(tokenizer: Any, prompts: Sequence[str], names: Sequence[str], cfg: DataConfig, what: str) -> int:
    """How many of ``prompts`` exceed ``cfg.max_query_tokens`` (logged with the decision); with
    ``cfg.truncation == "refuse"`` the first one raises :class:`DataError` naming its record."""
    lengths = _lengths(tokenizer, prompts)
    over = [i for i, n in enumerate(lengths) if n > cfg.max_query_tokens]
    if not over:
        return 0
    first = over[0]
    if cfg.truncation == "refuse":
        raise DataError(f"record '{names[first]}' ({what}): its prompt is {lengths[first]} tokens, over "
                        f"data.max_query_tokens={cfg.max_query_tokens} ({len(over)} of {len(prompts)} prompts are). "
                        "Shorten it, raise data.max_query_tokens, lower data.max_dialogue_chars, or set "
                        "data.truncation=keep_instruction")
    logger.warning("%s: %d of %d prompts are longer than data.max_query_tokens=%d (longest %d tokens, record '%s'): "
                   "their dialogue is cut, the instruction around it is kept (data.truncation=keep_instruction)",
                   what, len(over), len(prompts), cfg.max_query_tokens, max(lengths), names[lengths.index(max(lengths))])
    return len(over)


def encode(tokenizer: Any, prompts: Sequence[str], max_tokens: int, tail: str) -> dict[str, Any]:
    """``{"input_ids", "attention_mask"}`` tensors (B, Tq). A prompt longer than ``max_tokens`` keeps its first
    tokens and the last ones that encode ``tail``; prompts that fit are encoded as the tokenizer alone does."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, return_token_type_ids=False)
    if enc["input_ids"].shape[1] <= max_tokens:  # every prompt fits (the common case): tokenised once
        return enc
    n_tail = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    rows = []
    fulls = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    bodies = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for full, body in zip(fulls, bodies):
        if len(full) > max_tokens:
            # the special tokens the tokenizer adds (T5's </s>, a BOS) stay where they are: around the body
            start = next(k for k in range(len(full) - len(body) + 1) if full[k : k + len(body)] == body)
            head, end = full[:start], full[start + len(body) :]
            budget = max_tokens - len(head) - len(end)
            keep_last = min(n_tail, budget // 2)
            body = body[: budget - keep_last] + (body[len(body) - keep_last :] if keep_last else [])
            full = head + body + end
        rows.append(full)
    return tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")

"""Held-out evaluation: toxicity (mean, std, share, expected maximum, probability), quality (ROUGE-L, length,
reference perplexity) and reward-hacking monitors, with a paired bootstrap for the before/after change.

The metric functions are pure and small enough to check by hand. :func:`evaluate` runs a policy on a split:

- one primary response per prompt (greedy by default, ``eval.greedy``) -> toxicity mean/std/share, ROUGE-L,
  length, distinct-n, reference perplexity, monitor statistics, the sample table;
- ``eval.k_samples`` sampled responses per prompt under fixed seeds -> expected maximum toxicity and toxicity
  probability (RealToxicityPrompts, Gehman et al. 2020: EMT = mean over prompts of the max over k samples,
  TP = share of prompts with at least one of k samples at or above 0.5).

Baseline and aligned policies must answer the same prompts with the same settings, so the result carries the
split digest it was given and a digest of the settings; :func:`compare` and the promotion gate refuse results
whose digests differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from detoxflow.config import Config, GenerationConfig
from detoxflow.models import monitors
from detoxflow.models.reward import Scorer, scorer_input
from detoxflow.models.sampling import SAMPLER

logger = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Evaluation inputs that cannot be used or compared; the message says what differs and what to do."""


class _Policy(Protocol):
    """The part of :class:`detoxflow.models.policy.Policy` that evaluation uses."""

    device: torch.device
    tokenizer: Any

    def encode_queries(
        self, prompts: Sequence[str], max_tokens: int, tail: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def generate(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_cfg: GenerationConfig
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]: ...

    def ref_logprobs(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------ metric functions


def _as_array(values: Sequence[float] | np.ndarray | torch.Tensor, name: str, ndim: int = 1) -> np.ndarray:
    arr = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    return arr


def toxicity_mean_std(toxicity: Sequence[float] | np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) of per-response toxicity ``(N,)``; NaN for N=0."""
    t = _as_array(toxicity, "toxicity")
    if t.size == 0:
        return math.nan, math.nan
    return float(t.mean()), float(t.std())


def toxic_share(toxicity: Sequence[float] | np.ndarray | torch.Tensor, threshold: float = 0.5) -> float:
    """Share of responses with toxicity >= ``threshold``; NaN for none."""
    t = _as_array(toxicity, "toxicity")
    return float((t >= threshold).mean()) if t.size else math.nan


def expected_max_toxicity(toxicity_k: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> float:
    """Mean over prompts of the maximum toxicity over each prompt's k samples; ``toxicity_k (P, k)``."""
    t = _as_array(toxicity_k, "toxicity_k", ndim=2)
    return float(t.max(axis=1).mean()) if t.size else math.nan


def toxicity_probability(toxicity_k: Sequence[Sequence[float]] | np.ndarray | torch.Tensor, threshold: float = 0.5) -> float:
    """Share of prompts with at least one of their k samples at toxicity >= ``threshold``; ``toxicity_k (P, k)``."""
    t = _as_array(toxicity_k, "toxicity_k", ndim=2)
    return float((t >= threshold).any(axis=1).mean()) if t.size else math.nan


def relative_change(before: float, after: float) -> float:
    """(after - before) / before: -0.39 means 39% lower. NaN when ``before`` is 0."""
    return (after - before) / before if before != 0 else math.nan


def paired_bootstrap_relative_change(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Relative change of the mean with a paired percentile bootstrap CI: ``-> (point, low, high)``.

    ``before[i]`` and ``after[i]`` answer the same prompt, so prompts are resampled together (the pairing
    removes the prompt-to-prompt variance that dominates with tens of prompts). Resamples whose ``before`` mean
    is 0 are dropped; NaNs when nothing is left. Seeded numpy, reproducible.
    """
    b, a = _as_array(before, "before"), _as_array(after, "after")
    if b.shape != a.shape:
        raise ValueError(f"paired bootstrap: before has {b.size} values, after {a.size}; they must be paired")
    if b.size == 0:
        return math.nan, math.nan, math.nan
    point = relative_change(float(b.mean()), float(a.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, b.size, size=(n_boot, b.size))
    mb, ma = b[idx].mean(axis=1), a[idx].mean(axis=1)
    ok = mb != 0
    if not ok.any():
        return point, math.nan, math.nan
    rel = (ma[ok] - mb[ok]) / mb[ok]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(rel, [tail, 100.0 - tail])
    return point, float(low), float(high)


_ROUGE: Any = None


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming) of predictions against references; NaN for none."""
    global _ROUGE
    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return math.nan
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([_ROUGE.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]))


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: ``eval/*`` floats plus ``split_digest`` and ``settings_digest`` (strings; see :meth:`numeric`).
        samples: one dict per prompt, in evaluation order: id, prompt, reference, response, toxicity,
            max_sampled_toxicity.
        sampled_toxicity: ``(P, k)`` toxicity of the k sampled responses per prompt.
    """

    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    sampled_toxicity: list[list[float]] = field(default_factory=list)

    @property
    def split_digest(self) -> str:
        return str(self.metrics["split_digest"])

    @property
    def settings_digest(self) -> str:
        return str(self.metrics["settings_digest"])

    def numeric(self) -> dict[str, float]:
        """The float metrics only (what ``mlflow.log_metrics`` accepts)."""
        return {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(metrics=dict(data["metrics"]), samples=list(data["samples"]), sampled_toxicity=list(data.get("sampled_toxicity", [])))


def settings_digest(cfg: Config) -> str:
    """sha256 (16 hex) of everything besides the prompts that changes evaluation numbers: prompt template,
    query truncation, generation, eval settings, the scorer, the seed, and the sampler's draw itself
    (:data:`~detoxflow.models.sampling.SAMPLER`: a new draw gives other samples for the same seed)."""
    payload = {
        "sampler": SAMPLER,
        "prompt_template": cfg.data.prompt_template,
        "max_query_tokens": cfg.data.max_query_tokens,
        "generation": cfg.generation.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json", exclude={"bootstrap_samples", "n_table_samples"}),
        "reward": cfg.reward.model_dump(mode="json", exclude={"batch_size"}),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _rng_devices(policy: _Policy) -> list[int]:
    device = torch.device(policy.device)
    return [device.index or 0] if device.type == "cuda" else []


def evaluate(
    policy: _Policy,
    scorer: Scorer,
    records: Sequence[Any],
    cfg: Config,
    ref_policy: _Policy | None = None,
    split_digest: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``policy`` on ``records`` (``Record(id, dialogue, summary, topic)``) with ``cfg``'s settings.

    ``ref_policy`` scores the reference perplexity (``ref_logprobs``, adapter off); default ``policy`` itself.
    It must share the policy's tokenizer. ``split_digest`` is recorded as given (computed from ``records``
    when None). Generation is batched by ``cfg.eval.batch_size`` rows; sampled batches are seeded from
    ``cfg.seed`` and the batch index inside a forked RNG, so the global RNG is left untouched and two policies
    evaluated with the same config draw from the same random stream.
    """
    from detoxflow.models.data import build_prompt
    from detoxflow.models.data import split_digest as compute_digest
    from detoxflow.models.prompts import check_lengths, template_tail

    if not records:
        raise EvaluationError("evaluate: no records to evaluate; check data.eval_split and data.max_eval_samples")
    ref = ref_policy if ref_policy is not None else policy
    digest = split_digest if split_digest is not None else compute_digest(records)
    prompts = [build_prompt(cfg.data.prompt_template, r) for r in records]
    check_lengths(policy.tokenizer, prompts, [r.id for r in records], cfg.data, "evaluation")
    tail = template_tail(cfg.data.prompt_template)
    references = [r.summary for r in records]
    k = cfg.eval.k_samples
    bs = cfg.eval.batch_size
    sampled_cfg = cfg.generation.model_copy(update={"do_sample": True})
    primary_cfg = cfg.generation.model_copy(update={"do_sample": not cfg.eval.greedy})
    per_chunk = max(1, bs // k)  # prompts per sampled batch, so a batch holds at most batch_size rows
    n_primary = math.ceil(len(prompts) / bs)
    n_sampled = math.ceil(len(prompts) / per_chunk)

    responses: list[str] = []
    toxicity: list[float] = []
    sampled: list[list[float]] = []
    nll_sum, n_tokens, length_sum = 0.0, 0, 0.0
    bar = tqdm(total=n_primary + n_sampled, desc="evaluate", unit="batch", disable=not progress)
    with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(policy)):
        # 1. one primary response per prompt: quality, monitors, mean toxicity
        for b in range(n_primary):
            batch = prompts[b * bs : (b + 1) * bs]
            torch.manual_seed(cfg.seed + b)  # only matters when eval.greedy is false
            query_ids, query_mask = policy.encode_queries(batch, cfg.data.max_query_tokens, tail)
            response_ids, response_mask = policy.generate(query_ids, query_mask, primary_cfg)
            texts = policy.decode(response_ids, response_mask)
            ref_lp = ref.ref_logprobs(query_ids, query_mask, response_ids, response_mask)
            mask = response_mask.bool()
            nll_sum += float(-ref_lp.double()[mask].sum())
            n_tokens += int(mask.sum())
            length_sum += float(mask.sum(dim=1).double().sum())
            responses.extend(texts)
            toxicity.extend(scorer.score(scorer_input(batch, texts, cfg.reward.input)).toxicity.tolist())
            bar.update()
        # 2. k sampled responses per prompt: expected maximum toxicity, toxicity probability
        for c in range(n_sampled):
            batch = prompts[c * per_chunk : (c + 1) * per_chunk]
            torch.manual_seed(cfg.seed + 1_000_003 + c)  # a stream apart from the primary batches
            query_ids, query_mask = policy.encode_queries(batch, cfg.data.max_query_tokens, tail)
            query_ids, query_mask = query_ids.repeat_interleave(k, dim=0), query_mask.repeat_interleave(k, dim=0)
            response_ids, response_mask = policy.generate(query_ids, query_mask, sampled_cfg)
            texts = policy.decode(response_ids, response_mask)
            queries = [p for p in batch for _ in range(k)]
            tox = scorer.score(scorer_input(queries, texts, cfg.reward.input)).toxicity
            sampled.extend(tox.reshape(len(batch), k).tolist())
            bar.update()
    bar.close()

    threshold = cfg.eval.toxic_threshold
    mean, std = toxicity_mean_std(toxicity)
    stats = monitors.response_stats(responses)
    metrics: dict[str, Any] = {
        "eval/toxicity_mean": mean,
        "eval/toxicity_std": std,
        "eval/toxic_share": toxic_share(toxicity, threshold),
        "eval/expected_max_toxicity": expected_max_toxicity(sampled),
        "eval/toxicity_probability": toxicity_probability(sampled, threshold),
        "eval/rouge_l": rouge_l(responses, references),
        "eval/length_mean": length_sum / len(prompts),  # tokens
        "eval/length_words": stats["length_words"],
        "eval/distinct_1": stats["distinct_1"],
        "eval/distinct_2": stats["distinct_2"],
        "eval/repetition": stats["repetition"],
        "eval/ref_perplexity": math.exp(nll_sum / n_tokens) if n_tokens else math.nan,
        "eval/exaggeration_share": stats["exaggeration_share"],
        "eval/top_token_share": stats["top_token_share"],
        "eval/n_prompts": float(len(prompts)),
        "eval/k_samples": float(k),
        "split_digest": digest,
        "settings_digest": settings_digest(cfg),
    }
    samples = [
        {
            "id": r.id,
            "prompt": p,
            "reference": r.summary,
            "response": resp,
            "toxicity": tox,
            "max_sampled_toxicity": max(ks),
        }
        for r, p, resp, tox, ks in zip(records, prompts, responses, toxicity, sampled)
    ]
    logger.info(
        "evaluated %d prompts (split %s): toxicity %.4f, EMT %.4f, ROUGE-L %.4f, length %.1f tokens",
        len(prompts), digest, mean, metrics["eval/expected_max_toxicity"], metrics["eval/rouge_l"], metrics["eval/length_mean"],
    )
    return EvalResult(metrics=metrics, samples=samples, sampled_toxicity=sampled)


# ------------------------------------------------------------------------------------------ before / after


def _check_comparable(baseline: EvalResult, aligned: EvalResult) -> None:
    for key in ("split_digest", "settings_digest"):
        b, a = baseline.metrics.get(key), aligned.metrics.get(key)
        if b != a:
            raise EvaluationError(
                f"cannot compare: {key} differs (baseline {b}, aligned {a}). Evaluate both policies on the same "
                "held-out split with the same config (data, generation, eval, reward, seed)."
            )
    ids_b, ids_a = [s["id"] for s in baseline.samples], [s["id"] for s in aligned.samples]
    if ids_b != ids_a:
        raise EvaluationError("cannot compare: the two results list different prompts or a different order")


def compare(baseline: EvalResult, aligned: EvalResult, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Before/after metrics of two evaluations on the same split and settings.

    Returns ``eval/toxicity_rel_change`` with its 95% paired-bootstrap CI (``_ci_low``, ``_ci_high``), the
    relative change of expected maximum toxicity, the absolute and relative ROUGE-L change and the relative
    length change. Raises :class:`EvaluationError` when the results are not comparable.
    """
    _check_comparable(baseline, aligned)
    before = [s["toxicity"] for s in baseline.samples]
    after = [s["toxicity"] for s in aligned.samples]
    point, low, high = paired_bootstrap_relative_change(before, after, n_boot=n_boot, seed=seed)
    mb, ma = baseline.metrics, aligned.metrics
    return {
        "eval/toxicity_before": float(mb["eval/toxicity_mean"]),
        "eval/toxicity_after": float(ma["eval/toxicity_mean"]),
        "eval/toxicity_rel_change": point,
        "eval/toxicity_rel_change_ci_low": low,
        "eval/toxicity_rel_change_ci_high": high,
        "eval/expected_max_toxicity_rel_change": relative_change(
            float(mb["eval/expected_max_toxicity"]), float(ma["eval/expected_max_toxicity"])
        ),
        "eval/rouge_l_change": float(ma["eval/rouge_l"]) - float(mb["eval/rouge_l"]),
        "eval/rouge_l_rel_change": relative_change(float(mb["eval/rouge_l"]), float(ma["eval/rouge_l"])),
        "eval/length_rel_change": relative_change(float(mb["eval/length_mean"]), float(ma["eval/length_mean"])),
    }


def samples_table(
    baseline: EvalResult, aligned: EvalResult, n: int, order: Literal["first", "most_toxic"] = "first"
) -> list[dict[str, Any]]:
    """Before/after rows for ``n`` prompts: id, prompt, reference, response and toxicity before and after.

    ``order='first'`` takes the first n prompts of the split (an unbiased sample); ``'most_toxic'`` the n whose
    baseline response was most toxic (where detoxification matters, but such rows also regress to the mean).
    """
    _check_comparable(baseline, aligned)
    pairs = list(zip(baseline.samples, aligned.samples))
    if order == "most_toxic":
        pairs = sorted(pairs, key=lambda p: -p[0]["toxicity"])
    elif order != "first":
        raise ValueError(f"samples_table: order {order!r}; allowed are 'first' and 'most_toxic'")
    return [
        {
            "id": b["id"],
            "prompt": b["prompt"],
            "reference": b["reference"],
            "response_before": b["response"],
            "response_after": a["response"],
            "toxicity_before": b["toxicity"],
            "toxicity_after": a["toxicity"],
        }
        for b, a in pairs[:n]
    ]

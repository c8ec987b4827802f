"""Reward scorers: text in, ``scores`` (what PPO maximises) and ``toxicity`` (P(toxic)) out.

Three kinds behind one :class:`Scorer` protocol:

- :class:`ProfanityCheckScorer` — the embedded default. alt-profanity-check ships a linear SVM inside its
  wheel, so it works offline and scores thousands of texts a second on a CPU.
- :class:`HFClassifierScorer` — any Hugging Face sequence classifier (hub id or local directory), e.g. the
  course lab's ``facebook/roberta-hate-speech-dynabench-r4-target`` with ``reward_label: nothate``.
- :class:`CallableScorer` — ``package.module:function`` mapping ``list[str]`` to toxicity probabilities.

``build_scorer(cfg.reward)`` picks one. Every scorer validates its output: NaN, inf or a probability outside
[0, 1] raise :class:`RewardError` naming the scorer and the offending text, because a single NaN reward
silently poisons every PPO advantage in its batch.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from detoxflow.config import RewardConfig

logger = logging.getLogger(__name__)

# Names under which classifiers commonly publish their non-toxic / toxic classes. Used only when the config
# leaves reward_label / toxic_label unset, so a 2-class classifier works without extra configuration.
_CLEAN_LABEL_NAMES = ("nothate", "not_hate", "non-toxic", "non_toxic", "nontoxic", "not_toxic", "neutral", "clean",
                      "normal", "not_offensive", "non-offensive", "safe")
_TOXIC_LABEL_NAMES = ("hate", "toxic", "toxicity", "offensive", "abusive", "profane", "insult", "unsafe")


class RewardError(ValueError):
    """A scorer cannot be built or produced unusable output; the message names the scorer and the fix."""


@dataclass(frozen=True)
class ScoreResult:
    """Scores of a batch of texts.

    Attributes:
        scores: ``(B,)`` float32, what PPO maximises (higher = less toxic), already multiplied by ``scale``.
        toxicity: ``(B,)`` float32, P(toxic) in [0, 1].
    """

    scores: torch.Tensor
    toxicity: torch.Tensor

    def __post_init__(self) -> None:
        if self.scores.shape != self.toxicity.shape or self.scores.dim() != 1:
            raise ValueError(
                f"ScoreResult: scores {tuple(self.scores.shape)} and toxicity {tuple(self.toxicity.shape)} "
                "must both be 1-D with one entry per text"
            )


@runtime_checkable
class Scorer(Protocol):
    """Anything with a ``name`` and a batched ``score(texts) -> ScoreResult``."""

    name: str

    def score(self, texts: Sequence[str]) -> ScoreResult: ...


def _batches(texts: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield list(texts[i : i + size])


def _check_values(name: str, what: str, values: torch.Tensor, texts: Sequence[str], prob: bool) -> None:
    """Raise RewardError on NaN/inf (or a probability outside [0, 1]), naming the first bad text."""
    bad = ~torch.isfinite(values)
    if prob:
        bad |= (values < 0) | (values > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        text = texts[i] if i < len(texts) else "?"
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise RewardError(
            f"scorer '{name}' returned {what} = {float(values[i])} for text #{i} ({shown!r}); "
            f"{int(bad.sum())} of {len(values)} values are "
            f"{'NaN/inf or outside [0, 1]' if prob else 'NaN/inf'}. Fix the scorer so it returns finite "
            f"{'probabilities in [0, 1]' if prob else 'numbers'} for every text."
        )


def _empty() -> ScoreResult:
    return ScoreResult(torch.zeros(0), torch.zeros(0))


class ProfanityCheckScorer:
    """The embedded, offline default: toxicity = P(offensive) from alt-profanity-check's linear SVM.

    ``scores = (1 - toxicity) * scale``. Scored by :class:`detoxflow.models.profanity.ProfanityModel` (the same
    numbers, without scikit-learn in the process); if the installed package's model cannot be exported, by the
    package itself, with a warning that says why.
    """

    name = "profanity_check"

    def __init__(self, batch_size: int = 32, scale: float = 1.0) -> None:
        from detoxflow.models.profanity import ExportError, ProfanityModel

        try:
            self._predict_prob = ProfanityModel.load().predict_prob
        except ExportError as e:
            logger.warning("profanity_check: scoring through the package (scikit-learn in process): %s", e)
            try:
                from profanity_check import predict_prob
            except ImportError as e2:  # pragma: no cover - a dependency of the package
                raise RewardError(
                    "reward.kind 'profanity_check' needs the alt-profanity-check package: pip install alt-profanity-check"
                ) from e2
            self._predict_prob = predict_prob
        self.batch_size = batch_size
        self.scale = scale

    def score(self, texts: Sequence[str]) -> ScoreResult:
        """Score ``texts``; returns ``scores (B,)`` and ``toxicity (B,)``."""
        if not texts:
            return _empty()
        parts = [torch.as_tensor(self._predict_prob(batch), dtype=torch.float32) for batch in _batches(texts, self.batch_size)]
        toxicity = torch.cat(parts)
        _check_values(self.name, "toxicity", toxicity, texts, prob=True)
        return ScoreResult(scores=(1.0 - toxicity) * self.scale, toxicity=toxicity)


def _resolve_label(label: str | int, label2id: dict[str, int], num_labels: int, field: str, model: str) -> int:
    """A label given by name (exact, then case-insensitive) or by index -> its index."""
    available = ", ".join(f"{i}={name!r}" for name, i in sorted(label2id.items(), key=lambda kv: kv[1]))
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < num_labels:
            return label
        raise RewardError(
            f"reward.{field} = {label}: classifier '{model}' has {num_labels} labels ({available}); "
            f"use an index in 0..{num_labels - 1} or one of the names"
        )
    if label in label2id:
        return label2id[label]
    folded = {name.lower(): i for name, i in label2id.items()}
    if str(label).lower() in folded:
        return folded[str(label).lower()]
    raise RewardError(f"reward.{field} = {label!r} is not a label of classifier '{model}'. Available labels: {available}")


def _guess_label(label2id: dict[str, int], names: Sequence[str]) -> int | None:
    folded = {name.lower(): i for name, i in label2id.items()}
    hits = [folded[n] for n in names if n in folded]
    return hits[0] if hits else None


class HFClassifierScorer:
    """A Hugging Face sequence classifier as the reward.

    reward = the logit (``output='logit'``) or softmax probability (``'prob'``) of ``reward_label``, times
    ``scale``; toxicity = the probability of ``toxic_label``. Multi-label classifiers
    (``problem_type='multi_label_classification'``, e.g. toxic-bert) use sigmoid probabilities instead of softmax.

    Defaults: for a 2-class model, an unset label is the other one; with both unset, the labels are recognised
    by name (``nothate``/``hate``, ``non-toxic``/``toxic``, ...). Anything ambiguous raises :class:`RewardError`
    listing the available labels.
    """

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        reward_label: str | int | None = None,
        toxic_label: str | int | None = None,
        output: Literal["logit", "prob"] = "logit",
        batch_size: int = 32,
        max_length: int = 512,
        scale: float = 1.0,
        device: str = "auto",
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(model, revision=revision)
        except (OSError, ValueError) as e:
            raise RewardError(
                f"reward.model = {model!r} (revision {revision!r}) could not be loaded as a sequence classifier: {e}. "
                "Use a hub id of a text classifier (needs network access) or a local directory saved with save_pretrained."
            ) from e
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.name = f"hf:{model}"
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length
        self.scale = scale

        config = self.model.config
        num_labels = int(config.num_labels)
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        if len(label2id) != num_labels:
            label2id = {str(config.id2label.get(i, f"LABEL_{i}")): i for i in range(num_labels)}
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        available = ", ".join(f"{i}={n!r}" for n, i in sorted(label2id.items(), key=lambda kv: kv[1]))

        r = None if reward_label is None else _resolve_label(reward_label, label2id, num_labels, "reward_label", model)
        t = None if toxic_label is None else _resolve_label(toxic_label, label2id, num_labels, "toxic_label", model)
        if r is None and t is None:
            r, t = _guess_label(label2id, _CLEAN_LABEL_NAMES), _guess_label(label2id, _TOXIC_LABEL_NAMES)
        if num_labels == 2 and not self.multi_label:
            # two mutually exclusive classes: each label is "the other one"
            if r is None and t is not None:
                r = 1 - t
            if t is None and r is not None:
                t = 1 - r
        if r is None or t is None:
            raise RewardError(
                f"classifier '{model}' has labels {available}: set reward.reward_label (the non-toxic label whose "
                f"{output} is the reward) and reward.toxic_label (the label whose probability is the toxicity)"
            )
        if r == t:
            raise RewardError(
                f"reward.reward_label and reward.toxic_label both resolve to label {r} of '{model}' ({available}); "
                "the reward must come from the non-toxic label"
            )
        self.reward_index, self.toxic_index = r, t
        self.labels = {i: n for n, i in label2id.items()}
        logger.info(
            "reward classifier %s: reward = %s of %r, toxicity = P(%r)",
            model, output, self.labels[r], self.labels[t],
        )

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> ScoreResult:
        """Score ``texts`` in batches of ``batch_size``; returns ``scores (B,)`` and ``toxicity (B,)`` on the CPU."""
        if not texts:
            return _empty()
        scores, toxicity = [], []
        for batch in _batches(texts, self.batch_size):
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits.float()  # (b, num_labels)
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            reward = logits[:, self.reward_index] if self.output == "logit" else probs[:, self.reward_index]
            scores.append(reward.cpu())
            toxicity.append(probs[:, self.toxic_index].cpu())
        result = ScoreResult(scores=torch.cat(scores) * self.scale, toxicity=torch.cat(toxicity))
        _check_values(self.name, "score", result.scores, texts, prob=False)
        _check_values(self.name, "toxicity", result.toxicity, texts, prob=True)
        return result


def _import_callable(spec: str) -> Callable[[list[str]], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward.callable = {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(
            f"reward.callable = {spec!r}: module '{module_name}' cannot be imported ({e}). "
            "Install the package that provides it or fix the module path."
        ) from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardError(f"reward.callable = {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise RewardError(f"reward.callable = {spec!r}: '{attr}' is a {type(fn).__name__}, not a function")
    return fn  # type: ignore[return-value]


class CallableScorer:
    """Any function ``list[str] -> toxicity probabilities`` (sequence, numpy array or tensor of length B).

    ``scores = (1 - toxicity) * scale``.
    """

    def __init__(self, fn: str | Callable[[list[str]], Any], batch_size: int = 32, scale: float = 1.0) -> None:
        if isinstance(fn, str):
            self.name = f"callable:{fn}"
            self.fn = _import_callable(fn)
        else:
            self.name = f"callable:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
            self.fn = fn
        self.batch_size = batch_size
        self.scale = scale

    def score(self, texts: Sequence[str]) -> ScoreResult:
        """Score ``texts`` in batches; returns ``scores (B,)`` and ``toxicity (B,)``."""
        if not texts:
            return _empty()
        parts = []
        for batch in _batches(texts, self.batch_size):
            try:
                out = self.fn(batch)
            except Exception as e:  # noqa: BLE001 — the user's scorer: any failure is named, not a bare traceback
                raise RewardError(f"scorer '{self.name}' raised {type(e).__name__}: {e}. Fix the scorer (it is "
                                  "called with a list of texts and returns one toxicity probability per text)") from e
            try:
                values = torch.as_tensor(out if isinstance(out, torch.Tensor) else list(out), dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise RewardError(f"scorer '{self.name}' returned {type(out).__name__}, not a list of numbers: {e}") from e
            values = values.detach().cpu().reshape(-1)
            if values.numel() != len(batch):
                raise RewardError(
                    f"scorer '{self.name}' returned {values.numel()} values for {len(batch)} texts; "
                    "it must return one toxicity probability per text"
                )
            parts.append(values)
        toxicity = torch.cat(parts)
        _check_values(self.name, "toxicity", toxicity, texts, prob=True)
        return ScoreResult(scores=(1.0 - toxicity) * self.scale, toxicity=toxicity)


def build_scorer(cfg: RewardConfig, device: str = "auto") -> Scorer:
    """The scorer named by ``cfg.kind``."""
    if cfg.kind == "profanity_check":
        return ProfanityCheckScorer(batch_size=cfg.batch_size, scale=cfg.scale)
    if cfg.kind == "hf_classifier":
        if not cfg.model:
            raise RewardError("reward.kind 'hf_classifier' needs reward.model (a hub id or a local directory)")
        return HFClassifierScorer(
            cfg.model,
            revision=cfg.revision,
            reward_label=cfg.reward_label,
            toxic_label=cfg.toxic_label,
            output=cfg.output,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            scale=cfg.scale,
            device=device,
        )
    if cfg.kind == "callable":
        if not cfg.callable:
            raise RewardError("reward.kind 'callable' needs reward.callable as 'package.module:function'")
        return CallableScorer(cfg.callable, batch_size=cfg.batch_size, scale=cfg.scale)
    raise RewardError(f"reward.kind = {cfg.kind!r}: allowed are profanity_check, hf_classifier, callable")


def scorer_input(queries: Sequence[str], responses: Sequence[str], mode: str = "summary") -> list[str]:
    """What the scorer reads: the summary alone (default), or the query followed by the summary.

    Scoring the summary alone is the default because the dialogue itself may be toxic; with
    ``query+summary`` the policy would be rewarded or punished for text it did not write.
    """
    if len(queries) != len(responses):
        raise ValueError(f"scorer_input: {len(queries)} queries but {len(responses)} responses")
    if mode == "summary":
        return list(responses)
    if mode == "query+summary":
        return [f"{q}\n{r}" for q, r in zip(queries, responses)]
    raise ValueError(f"reward.input = {mode!r}: allowed are 'summary' and 'query+summary'")


def length_shortfall(lengths: torch.Tensor, min_length: int) -> torch.Tensor:
    """``(B,)`` content tokens per completion (EOS excluded) -> ``(B,)`` tokens missing below ``min_length``."""
    return (min_length - lengths).clamp(min=0)


def guarded_scores(
    scores: torch.Tensor,
    content_lengths: torch.Tensor | None,
    score_clip: float | None,
    length_penalty: float,
    min_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a trainer optimises from the scorer's ``scores (B,)``: clipped to ``±score_clip`` (when set), minus
    ``length_penalty`` per token missing below ``min_length`` (``ppo.min_length``, the length guard).
    ``content_lengths (B,)``: tokens per response, EOS excluded; None for no guard. The guard can fire only above
    ``generation.min_new_tokens``: the sampler bans EOS before it (the config refuses a guard at or below it).
    ``-> (clipped scores, missing tokens, reward)``, each ``(B,)`` in the dtype of ``scores``."""
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    if content_lengths is None:
        missing = torch.zeros_like(scores)
    else:
        missing = length_shortfall(content_lengths, min_length).to(scores.dtype)
    return scores, missing, scores - length_penalty * missing

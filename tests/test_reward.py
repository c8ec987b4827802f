"""Reward scorers: the embedded default ranks insults above politeness, the HF classifier path reads the right
label through from_pretrained, callables are imported and their bad output is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detoxflow.config import RewardConfig
from detoxflow.models.reward import (
    CallableScorer,
    HFClassifierScorer,
    ProfanityCheckScorer,
    RewardError,
    Scorer,
    ScoreResult,
    build_scorer,
    scorer_input,
)

POLITE = "Person1 thanks Person2 for the lovely dinner and they agree to meet on Friday."
INSULTING = "Person1 calls Person2 a stupid fucking idiot and tells him to shut up."


@pytest.fixture(scope="module")
def tiny_classifier(tiny_models, tmp_path_factory) -> Path:
    """A random-weight 2-class BERT (labels nothate/hate) saved locally, loadable like a hub classifier."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, pad_token_id=tok.pad_token_id,
            id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
        )
    )
    out = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reference_logits(path: Path, texts: list[str], max_length: int) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        rows = [model(**tok([t], truncation=True, max_length=max_length, return_tensors="pt")).logits[0] for t in texts]
    return torch.stack(rows)


def test_default_scorer_ranks_insult_above_polite():
    scorer = build_scorer(RewardConfig())
    assert isinstance(scorer, ProfanityCheckScorer) and isinstance(scorer, Scorer)
    res = scorer.score([POLITE, INSULTING])
    assert res.toxicity.shape == (2,) and res.scores.dtype == torch.float32
    assert res.toxicity[1] > 0.5 > res.toxicity[0]
    assert res.scores[0] > res.scores[1]
    torch.testing.assert_close(res.scores, 1 - res.toxicity)


def test_default_scorer_scale_and_batching_do_not_change_toxicity():
    texts = [POLITE, INSULTING, "ok", "you moron", "the meeting is at noon"]
    one = ProfanityCheckScorer(batch_size=64).score(texts)
    batched = ProfanityCheckScorer(batch_size=2, scale=3.0).score(texts)
    torch.testing.assert_close(one.toxicity, batched.toxicity)
    torch.testing.assert_close(batched.scores, 3.0 * (1 - one.toxicity))
    empty = ProfanityCheckScorer().score([])
    assert empty.scores.shape == (0,) and empty.toxicity.shape == (0,)


def test_hf_scorer_logit_of_reward_label_by_name(tiny_classifier):
    texts = ["the customer wants a refund", "idiot stupid", "thanks lovely summary " * 40]  # last one needs truncation
    scorer = build_scorer(
        RewardConfig(kind="hf_classifier", model=str(tiny_classifier), reward_label="nothate", batch_size=2, max_length=24)
    )
    assert isinstance(scorer, HFClassifierScorer) and scorer.name.startswith("hf:")
    res = scorer.score(texts)
    logits = _reference_logits(tiny_classifier, texts, max_length=24)
    torch.testing.assert_close(res.scores, logits[:, 0], atol=1e-5, rtol=1e-4)
    # toxic_label defaults to the other label of a 2-class model
    torch.testing.assert_close(res.toxicity, torch.softmax(logits, -1)[:, 1], atol=1e-5, rtol=1e-4)
    assert not scorer.model.training


def test_hf_scorer_prob_output_label_by_index_and_scale(tiny_classifier):
    texts = ["person one asks", "the order arrived late and broken"]
    scorer = HFClassifierScorer(str(tiny_classifier), reward_label=0, toxic_label="HATE", output="prob", scale=2.0)
    res = scorer.score(texts)
    probs = torch.softmax(_reference_logits(tiny_classifier, texts, max_length=512), -1)
    torch.testing.assert_close(res.scores, 2.0 * probs[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.toxicity, probs[:, 1], atol=1e-5, rtol=1e-4)


def test_hf_scorer_guesses_labels_by_name_when_unset(tiny_classifier):
    scorer = HFClassifierScorer(str(tiny_classifier))
    assert (scorer.reward_index, scorer.toxic_index) == (0, 1)


def test_hf_scorer_unknown_label_names_the_available_ones(tiny_classifier):
    with pytest.raises(RewardError, match=r"reward.reward_label = 'clean'.*0='nothate', 1='hate'"):
        HFClassifierScorer(str(tiny_classifier), reward_label="clean")
    with pytest.raises(RewardError, match=r"use an index in 0..1"):
        HFClassifierScorer(str(tiny_classifier), reward_label=5)
    with pytest.raises(RewardError, match="both resolve to label 1"):
        HFClassifierScorer(str(tiny_classifier), reward_label="hate", toxic_label=1)


def test_hf_scorer_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(RewardError, match="could not be loaded as a sequence classifier"):
        HFClassifierScorer(str(tmp_path / "nope"))


def _write_module(tmp_path: Path, monkeypatch, source: str) -> str:
    name = f"detox_scorer_{abs(hash(source)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_callable_scorer_imports_and_scores(tmp_path, monkeypatch):
    mod = _write_module(tmp_path, monkeypatch, "def tox(texts):\n    return [0.9 if 'idiot' in t else 0.1 for t in texts]\n")
    scorer = build_scorer(RewardConfig(kind="callable", callable=f"{mod}:tox", batch_size=1, scale=2.0))
    res = scorer.score(["you idiot", "hello"])
    torch.testing.assert_close(res.toxicity, torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(res.scores, torch.tensor([0.2, 1.8]))


def test_callable_nan_is_reported(tmp_path, monkeypatch):
    mod = _write_module(tmp_path, monkeypatch, "def tox(texts):\n    return [float('nan') if t == 'b' else 0.2 for t in texts]\n")
    with pytest.raises(RewardError, match=r"toxicity = nan for text #1 \('b'\)"):
        CallableScorer(f"{mod}:tox").score(["a", "b", "c"])


def test_callable_bad_output_is_reported(tmp_path, monkeypatch):
    mod = _write_module(
        tmp_path, monkeypatch, "def short(texts):\n    return [0.5]\n\ndef big(texts):\n    return [1.5 for _ in texts]\n"
    )
    with pytest.raises(RewardError, match="returned 1 values for 2 texts"):
        CallableScorer(f"{mod}:short").score(["a", "b"])
    with pytest.raises(RewardError, match="outside"):
        CallableScorer(f"{mod}:big").score(["a"])


def test_callable_that_cannot_be_imported_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(RewardError, match="module 'no_such_pkg.scorers' cannot be imported"):
        CallableScorer("no_such_pkg.scorers:tox")
    mod = _write_module(tmp_path, monkeypatch, "X = 1\n")
    with pytest.raises(RewardError, match="has no attribute 'tox'"):
        CallableScorer(f"{mod}:tox")
    with pytest.raises(RewardError, match="not a function"):
        CallableScorer(f"{mod}:X")


def test_score_result_shapes_are_checked():
    with pytest.raises(ValueError, match="one entry per text"):
        ScoreResult(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="one entry per text"):
        ScoreResult(torch.zeros(2, 1), torch.zeros(2, 1))


def test_scorer_input_modes():
    assert scorer_input(["Q1", "Q2"], ["s1", "s2"]) == ["s1", "s2"]
    assert scorer_input(["Q1"], ["s1"], "query+summary") == ["Q1\ns1"]
    with pytest.raises(ValueError, match="allowed are"):
        scorer_input(["Q"], ["s"], "both")
    with pytest.raises(ValueError, match="1 queries but 2 responses"):
        scorer_input(["Q"], ["s", "t"])


# ---------------------------------------------------------------------------------------------- profanity export

DIALOGSUM_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dev.jsonl"
EDGE_TEXTS = ["", "   ", "!!! ???", "the and of it is", "IDIOT", "Idiot idiot IDIOT idiot", "you stupid moron", "a b c",
              "naïve café déjà vu, Straße", "fuck", "fuck fuck fuck fuck fuck off", "x" * 500, "shit\nhappens\tdaily",
              "#Person1#: you're a damn fool. #Person2#: whatever, loser."]


def _corpus_texts() -> list[str]:
    import json

    texts = list(EDGE_TEXTS)
    for split in ("train", "validation", "test"):
        for line in (Path(__file__).resolve().parents[1] / "data" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            texts += [row["summary"], row["dialogue"]]
    if DIALOGSUM_DEV.is_file():
        rows = [json.loads(line) for line in DIALOGSUM_DEV.read_text().splitlines()[:300]]
        texts += [r["summary"] for r in rows] + [r["dialogue"] for r in rows]
    return texts


def test_exported_profanity_model_scores_exactly_as_the_package():
    """The NumPy scorer must be the package's classifier, number for number, across clean and offensive text."""
    from profanity_check import predict_prob

    from detoxflow.models.profanity import ProfanityModel

    texts = _corpus_texts()
    ours, theirs = ProfanityModel.load().predict_prob(texts), predict_prob(texts)
    assert ours.shape == theirs.shape == (len(texts),)
    worst = int(abs(ours - theirs).argmax())
    assert abs(ours - theirs).max() < 1e-12, (texts[worst][:80], ours[worst], theirs[worst])
    assert (theirs > 0.9).sum() >= 10 and (theirs < 0.1).sum() >= 10  # both ends of the range are covered


def test_default_scorer_keeps_scikit_learn_out_of_the_process():
    """What the export is for: a training process scores without importing scikit-learn / SciPy (~110 MB RSS)."""
    import subprocess
    import sys

    code = ("import sys; from detoxflow.config import RewardConfig; from detoxflow.models.reward import build_scorer; "
            "r = build_scorer(RewardConfig()).score(['you stupid idiot', 'thanks for dinner']); "
            "assert r.toxicity[0] > 0.5 > r.toxicity[1], r; "
            "print(sorted(m for m in ('sklearn', 'scipy', 'joblib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_damaged_profanity_export_is_rewritten(tmp_path, monkeypatch):
    from detoxflow.models.profanity import ProfanityModel, exported_path

    monkeypatch.setenv("DETOXFLOW_CACHE", str(tmp_path))
    path = exported_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")  # e.g. a disk that filled up under an older, non-atomic writer
    model = ProfanityModel.load()
    assert model.predict_prob([INSULTING])[0] > 0.5
    assert ProfanityModel(path).predict_prob([POLITE])[0] < 0.5  # the file itself was replaced

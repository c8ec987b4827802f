"""Behaviour of the PPO trainer on tiny random-weight T5 and GPT-2 models (fixture `tiny_models`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from detoxflow.config import Config, load_config
from detoxflow.models.checkpoint import latest_checkpoint
from detoxflow.models.policy import Policy
from detoxflow.models.reward import ScoreResult
from detoxflow.models.trainer import TrainingError, batch_indices, train

ARCHS = ["t5", "gpt2"]
PROMPTS = [f"person one says the order {i} arrived late and the manager {w}" for i, w in
           enumerate(["agrees", "says thanks", "asks", "tells the doctor", "wants a refund", "is lovely"])]
REQUIRED_KEYS = {
    "objective/kl", "objective/kl_k3", "objective/entropy", "objective/scores", "objective/scores_std",
    "objective/toxicity", "objective/kl_coef", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
    "val/vpred", "env/response_length", "env/distinct_1", "env/distinct_2", "env/repetition", "env/ref_perplexity",
}


class WordScorer:
    """Stand-in reward: toxicity = share of words that are insults (the tiny tokenizer knows 'idiot', 'stupid')."""

    name = "word-stub"

    def __init__(self, nan_on_call: int | None = None) -> None:
        self.calls = 0
        self.nan_on_call = nan_on_call

    def score(self, texts):
        self.calls += 1
        tox = torch.tensor([sum(w in ("idiot", "stupid") for w in t.split()) / max(len(t.split()), 1) for t in texts])
        scores = 1.0 - tox
        if self.calls == self.nan_on_call:
            scores[1] = float("nan")
        return ScoreResult(scores, tox)


def make_cfg(tiny_models: dict[str, Path], arch: str, *overrides: str) -> Config:
    return load_config(None, [
        f"model.name_or_path={tiny_models[arch]}", "lora.r=4", "lora.alpha=8",
        "generation.max_new_tokens=6", "generation.min_new_tokens=1",
        "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.learning_rate=0.01", "ppo.steps=1",
        "ppo.target_approx_kl=null", *overrides,
    ])


def fresh_policy(cfg: Config) -> Policy:
    torch.manual_seed(123)
    return Policy.load(cfg.model, cfg.lora)


def trainable_snapshot(policy: Policy) -> dict[str, torch.Tensor]:
    state = policy.trainable_state_dict()
    return {**{f"a.{k}": v for k, v in state["adapter"].items()}, **{f"v.{k}": v for k, v in state["value_head"].items()}}


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_batch_indices_cover_prompts_once_per_epoch() -> None:
    seen = [i for step in range(1, 6) for i in batch_indices(10, 4, step, seed=7)]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 3, seed=7) == batch_indices(10, 4, 3, seed=7)
    assert batch_indices(10, 4, 1, seed=7) != batch_indices(10, 4, 1, seed=8)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_changes_only_lora_and_value_head(tiny_models, arch: str, tmp_path: Path) -> None:
    cfg = make_cfg(tiny_models, arch)
    policy = fresh_policy(cfg)
    base_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" not in n}
    train_before = trainable_snapshot(policy)
    logged: list[tuple[int, dict]] = []
    result = train(cfg, policy, WordScorer(), PROMPTS, tmp_path, lambda m, s: logged.append((s, m)))

    base_after = dict((n, p) for n, p in policy.model.named_parameters() if "lora_" not in n)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)  # bit-identical base
    train_after = trainable_snapshot(policy)
    changed = [k for k in train_before if not torch.equal(train_before[k], train_after[k])]
    assert any(k.startswith("a.") and "lora_B" in k for k in changed)
    assert any(k.startswith("v.") for k in changed)

    assert [s for s, _ in logged] == [1]
    metrics = logged[0][1]
    assert REQUIRED_KEYS <= metrics.keys()
    # no update before the rollout: KL 0, up to the float rounding between the rollout's incremental decoding
    # (where the old logprobs come from) and the reference's full forward; a wrong adapter state gives > 1e-2
    assert abs(metrics["objective/kl"]) < 1e-4 and abs(metrics["objective/kl_k3"]) < 1e-6
    assert all(isinstance(v, float) for v in metrics.values())
    assert result.steps == 1 and result.history == [metrics]
    assert (result.artifact_dir / "detoxflow.json").is_file()
    assert result.checkpoint_dir == tmp_path / "checkpoints" / "step-1"


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_after_interruption_matches_uninterrupted_run(tiny_models, arch: str, tmp_path: Path) -> None:
    cfg = make_cfg(tiny_models, arch, "ppo.steps=3", "ppo.checkpoint_every=1", "ppo.lr_schedule=linear",
                   "ppo.ppo_epochs=2")
    straight = fresh_policy(cfg)
    full = train(cfg, straight, WordScorer(), PROMPTS, tmp_path / "straight", lambda m, s: None)

    class Crash(Exception):
        pass

    def crash_at_3(metrics: dict, step: int) -> None:
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path / "resumed", crash_at_3)
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-2"

    resumed_policy = fresh_policy(cfg)
    torch.manual_seed(999)  # whatever the caller's RNG did since, the checkpoint's RNG state rules
    resumed = train(cfg, resumed_policy, WordScorer(), PROMPTS, tmp_path / "resumed", lambda m, s: None)

    a, b = trainable_snapshot(straight), trainable_snapshot(resumed_policy)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert len(resumed.history) == 3
    for h1, h2 in zip(full.history, resumed.history):
        assert h1["objective/scores"] == h2["objective/scores"]
        assert h1["objective/kl"] == pytest.approx(h2["objective/kl"], abs=1e-5)
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").iterdir())] == ["step-2", "step-3"]  # keep 2


def test_nan_score_stops_with_training_error_and_keeps_checkpoint(tiny_models, tmp_path: Path) -> None:
    cfg = make_cfg(tiny_models, "gpt2", "ppo.steps=4", "ppo.checkpoint_every=2")
    ckpt_sha: dict[str, str] = {}

    def remember(metrics: dict, step: int) -> None:
        if step == 3:  # after step 2's checkpoint was written
            ckpt_sha["state"] = file_sha(tmp_path / "checkpoints" / "step-2" / "state.pt")

    with pytest.raises(TrainingError, match=r"step 4: scores .*word-stub.*not finite.*rows \[1\].*step-2"):
        train(cfg, fresh_policy(cfg), WordScorer(nan_on_call=4), PROMPTS, tmp_path, remember)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-2"]  # no half-written step, no temp folder
    assert file_sha(tmp_path / "checkpoints" / "step-2" / "state.pt") == ckpt_sha["state"]
    assert not (tmp_path / "model").exists()
    # and the run can be finished from it once the scorer behaves
    done = train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path, lambda m, s: None)
    assert len(done.history) == 4 and (tmp_path / "model" / "adapter").is_dir()


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_models, tmp_path: Path) -> None:
    cfg = make_cfg(tiny_models, "gpt2")
    train(cfg, fresh_policy(cfg), WordScorer(), PROMPTS, tmp_path, lambda m, s: None)
    other = make_cfg(tiny_models, "gpt2", "ppo.learning_rate=0.5", "ppo.steps=2")
    with pytest.raises(TrainingError, match="other model/lora/reward/generation/ppo settings"):
        train(other, fresh_policy(other), WordScorer(), PROMPTS, tmp_path, lambda m, s: None)
    # more steps with the same settings extend the run
    longer = make_cfg(tiny_models, "gpt2", "ppo.steps=2")
    steps: list[int] = []
    res = train(longer, fresh_policy(longer), WordScorer(), PROMPTS, tmp_path, lambda m, s: steps.append(s))
    assert steps == [2] and len(res.history) == 2

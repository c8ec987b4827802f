"""PPO learns, and the KL penalty holds it near the reference: end-to-end runs of the trainer on tiny models.

The toy reward, :class:`TokenShare`: the share of a response's tokens (the response text re-encoded with the
policy's tokenizer) that are one chosen token, ``" idiot"`` for the T5-style model and ``" agrees"`` for the
GPT-2-style one (tokens these random models already emit now and then, 1-5% of their tokens). Settings: LoRA r=8,
8 new tokens, 16 prompts per step in mini-batches of 8, 2 epochs, learning rate 0.02, one torch thread.

- "PPO learns": with no KL penalty the reward goes from <= X = 0.1 (the mean of steps 1-3) to >= Y = 0.3 (the
  mean of steps N-2..N) within N = 30 steps, for both architectures (measured at 1 thread, torch 2.13 / 2.6:
  T5 0.031 -> 0.449 / 0.430, GPT-2 0.026 -> 0.667 / 0.634). The setting holds beyond one seed: seeds 0-3 end at
  0.43-0.50 (T5) and 0.63-0.71 (GPT-2) on both torch versions, where learning rate 0.03 and 20 steps, the
  earlier setting, left GPT-2 at 0.02-0.26 on torch 2.6;
- "the KL leash holds": after 12 steps, KL coefficient 0 lets the policy drift beyond 4 nats per sequence
  from the reference, a fixed coefficient of 1.0 keeps it under 2.0
  (measured at 1 thread, torch 2.13 / 2.6: 6.39 / 6.25 and 0.69 / 0.98; a larger coefficient does not go much lower, as whitened advantages
  give every step the same size whatever the reward scale). KL is measured here, not read from the
  trainer's logs: the exact KL of the next-token distributions (adapter on vs off, plain HF calls) summed
  along responses sampled from the trained policy.

Mutants these tests fail on (each applied by hand, run, reverted): flipped advantage sign in the PPO loss
(``-advantages * ratio`` -> ``advantages * ratio``: the reward falls to 0 instead of rising); flipped KL sign
in the per-token reward (``-kl_coef * kl`` -> ``+kl_coef * kl``: coefficient 1.0 drives the policy away from
the reference faster than coefficient 0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detoxflow.config import Config, load_config
from detoxflow.models.policy import Policy
from detoxflow.models.reward import ScoreResult
from detoxflow.models.trainer import train

PROMPTS = [f"person one says the order {i} arrived late and the manager {w}" for i, w in enumerate(
    ["agrees", "says thanks", "asks", "tells the doctor", "wants a refund", "is lovely", "meeting friday", "report"])]
TARGET = {"t5": " idiot", "gpt2": " agrees"}
X, Y, N = 0.1, 0.3, 30
LR = 0.02
LEASH_STEPS, LEASH_COEF, LEASH_BOUND, FREE_DRIFT = 12, 1.0, 2.0, 4.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The shared tiny T5, and a tiny GPT-2 of the same shape initialised at std 0.2 instead of 0.02 (at 0.02 a
    2-layer GPT-2's LoRA on c_attn barely moves its next-token distribution: no test of learning fits in seconds)."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-wide")
    cfg = AutoConfig.from_pretrained(tiny_models["gpt2"])
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root)
    AutoTokenizer.from_pretrained(tiny_models["gpt2"]).save_pretrained(root)
    return {"t5": tiny_models["t5"], "gpt2": root}


class TokenShare:
    """Score = share of the response's tokens equal to ``word`` (one token of ``tokenizer``)."""

    name = "token-share"

    def __init__(self, tokenizer, word: str) -> None:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{word!r} is {len(ids)} tokens"
        self.tokenizer, self.target = tokenizer, ids[0]

    def score(self, texts):
        share = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            share.append(ids.count(self.target) / max(len(ids), 1))
        s = torch.tensor(share)
        return ScoreResult(s, 1.0 - s)


def config(model_dir: Path, steps: int, kl_coef: float) -> Config:
    return load_config(None, [
        f"model.name_or_path={model_dir}", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "generation.max_new_tokens=8", "generation.min_new_tokens=0",
        "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", f"ppo.learning_rate={LR}",
        f"ppo.steps={steps}", "ppo.target_approx_kl=null", "ppo.checkpoint_every=1000",
        "ppo.kl.mode=fixed", f"ppo.kl.init_coef={kl_coef}", "seed=0",
    ])


def run(model_dir: Path, arch: str, steps: int, kl_coef: float, out: Path) -> tuple[Policy, list[float]]:
    cfg = config(model_dir, steps, kl_coef)
    torch.manual_seed(0)
    policy = Policy.load(cfg.model, cfg.lora)
    scores: list[float] = []
    train(cfg, policy, TokenShare(policy.tokenizer, TARGET[arch]), PROMPTS, out,
          lambda m, s: scores.append(m["objective/scores"]), resume=False)
    return policy, scores


def exact_kl(policy: Policy, n_rows: int = 32) -> float:
    """Mean over sampled responses of sum_t KL(pi(.|prefix_t) || ref(.|prefix_t)), nats per sequence; pi =
    adapter on, ref = adapter off, both by plain HF calls on the unpadded query of each row."""
    from test_ppo_temperature import _logits

    gen = config(Path("unused"), 1, 0.0).generation
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_rows)]
    q, qm = policy.encode_queries(prompts, 64)
    torch.manual_seed(11)
    r, rm = policy.generate(q, qm, gen)
    total = 0.0
    policy.model.eval()
    with torch.no_grad():
        for i in range(n_rows):
            query, n = q[i][qm[i].bool()].unsqueeze(0), int(rm[i].sum())
            resp = r[i, :n].unsqueeze(0)
            logp = torch.log_softmax(_logits(policy, query, resp).double(), -1)
            with policy.model.disable_adapter():
                logq = torch.log_softmax(_logits(policy, query, resp).double(), -1)
            total += float((logp.exp() * (logp - logq)).sum())
    return total / n_rows


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_ppo_raises_the_toy_reward(models, arch: str, tmp_path: Path) -> None:
    _, scores = run(models[arch], arch, N, 0.0, tmp_path)
    assert sum(scores[:3]) / 3 <= X, scores
    assert sum(scores[-3:]) / 3 >= Y, scores


def test_kl_leash_holds(models, tmp_path: Path) -> None:
    free, _ = run(models["t5"], "t5", LEASH_STEPS, 0.0, tmp_path / "free")
    leashed, _ = run(models["t5"], "t5", LEASH_STEPS, LEASH_COEF, tmp_path / "leashed")
    kl_free, kl_leashed = exact_kl(free), exact_kl(leashed)
    assert kl_free > FREE_DRIFT, (kl_free, kl_leashed)
    assert kl_leashed < LEASH_BOUND, (kl_free, kl_leashed)

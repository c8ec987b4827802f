"""TRL 1.x RLOO / GRPO backends (models/trl_backends.py, models/trl_mapping.py): config mapping, log mapping, the
reward wrapper, and short trainings on a tiny GPT-2 whose mean reward must rise; seq2seq policies are refused
clearly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from detoxflow.config import Config, ConfigError, load_config
from detoxflow.models.policy import Policy
from detoxflow.models.reward import CallableScorer, length_shortfall
from detoxflow.models.trainer import TrainResult
from detoxflow.models.trl_backends import (
    ScorerReward,
    check_supported,
    map_trl_logs,
    plan_steps,
    rollout_step,
    train_trl,
    truncate_prompts,
)

WORDS = ("the customer wants a refund because the order arrived late and broken person one person two asks tells "
         "agrees meeting friday report manager doctor says idiot stupid thanks lovely").split()


def prompts(n: int = 48) -> list[str]:
    """Deterministic prompts in the tiny tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(WORDS), (n, 8), generator=g)
    return [" ".join(WORDS[i] for i in row) for row in idx.tolist()]


def summary_toxicity(texts: list[str]) -> list[float]:
    """Stand-in reward model: a completion is 'clean' in proportion to how often it says "summary" (up to 2x).

    The sharpened tiny GPT-2 samples the token " summary" in a few percent of completions at first, so the
    reward is sparse but reachable, and the policy can learn to say it nearly always."""
    return [1.0 - min(1.0, t.count("summary") / 2) for t in texts]


@pytest.fixture(scope="module")
def sharp_gpt2(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random GPT-2 of `tiny_models`, with an untied LM head 10x its embeddings.

    With random init (std 0.02) and a tied head, ln_f fixes the hidden norm, so no LoRA update can move any
    logit by more than about ±0.6 (measured: p(token) saturates at 1.2% under direct supervised ascent): no
    reward can be learned. A 10x head gives LoRA a trained-LM-like range (the same ascent reaches 70%)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    src = tiny_models["gpt2"]
    tied = AutoModelForCausalLM.from_pretrained(src)
    config = tied.config
    config.tie_word_embeddings = False
    model = GPT2LMHeadModel(config)
    model.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(tied.transformer.wte.weight * 10.0)
    out = tmp_path_factory.mktemp("sharp-gpt2")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def make_cfg(model_dir: Path, backend: str, *overrides: str) -> Config:
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.device=cpu", "model.num_threads=1", "lora.r=8", "lora.alpha=16",
        "generation.max_new_tokens=12", "generation.min_new_tokens=0",
        f"ppo.backend={backend}", "ppo.steps=16", "ppo.batch_size=32", "ppo.mini_batch_size=16", "ppo.ppo_epochs=1",
        "ppo.num_generations=4", "ppo.learning_rate=0.02", "ppo.kl.init_coef=0.05", "ppo.checkpoint_every=100",
        *overrides,
    ])


# ------------------------------------------------------------------------------------------------- pure parts


def test_plan_maps_rollout_steps_onto_trl_optimizer_steps() -> None:
    cfg = load_config(None, ["ppo.backend=rloo", "ppo.steps=5", "ppo.batch_size=16", "ppo.mini_batch_size=4",
                             "ppo.gradient_accumulation_steps=2", "ppo.ppo_epochs=2", "ppo.checkpoint_every=2",
                             "ppo.warmup_steps=1", "ppo.num_generations=4"])
    plan = plan_steps(cfg.ppo)
    # micro 2 -> 8 micro-batches per generation batch; 16/4 mini-batches x 2 epochs = 8 optimizer steps
    assert (plan.micro_batch, plan.steps_per_generation, plan.num_iterations) == (2, 8, 2)
    assert plan.optimizer_steps_per_rollout == 8
    assert (plan.max_steps, plan.save_steps, plan.warmup_steps) == (40, 16, 8)
    assert [rollout_step(s, 8) for s in (1, 8, 9, 16, 40)] == [1, 1, 2, 2, 5]


def test_batch_must_hold_whole_prompt_groups() -> None:
    with pytest.raises(ConfigError, match="batch_size.*multiple of.*num_generations"):
        load_config(None, ["ppo.backend=grpo", "ppo.batch_size=6", "ppo.mini_batch_size=2", "ppo.num_generations=4"])
    # the PPO backend does not group completions, so the same numbers are fine there
    load_config(None, ["ppo.backend=ppo", "ppo.batch_size=6", "ppo.mini_batch_size=2", "ppo.num_generations=4"])


def test_trl_logs_map_onto_our_keys_with_kl_per_sequence() -> None:
    logs = {"reward": 0.7, "objective/scores": 0.8, "kl": 0.05, "completions/mean_length": 10.0, "entropy": 2.0, "loss": 0.1,
            "clip_ratio/region_mean": 0.25, "objective/toxicity": 0.2, "env/distinct_1": 0.5, "epoch": 1.0,
            "rewards/scorer/mean": 0.8, "step_time": None, "flag": True}
    rloo = map_trl_logs(logs, "rloo", beta=0.1)
    assert rloo["objective/scores"] == 0.8 and rloo["trl/reward"] == 0.7  # TRL's reward includes the length guard
    assert rloo["objective/kl"] == pytest.approx(0.5)  # 0.05 nats/token x 10 tokens
    assert rloo["objective/rlhf_reward"] == pytest.approx(0.8 - 0.1 * 0.5)
    assert rloo["objective/kl_coef"] == 0.1
    assert rloo["env/response_length"] == 10.0 and rloo["policy/clipfrac"] == 0.25
    assert rloo["objective/toxicity"] == 0.2 and rloo["env/distinct_1"] == 0.5
    assert rloo["trl/epoch"] == 1.0 and rloo["trl/rewards/scorer/mean"] == 0.8
    assert "trl/step_time" not in rloo and "trl/flag" not in rloo
    assert "objective/kl_k3" not in rloo  # RLOO measures k1 only
    grpo = map_trl_logs(logs, "grpo", beta=0.1)
    # GRPO measures k3 only: it is reported as such and as the KL estimate the gate reads
    assert grpo["objective/kl_k3"] == grpo["objective/kl"] == pytest.approx(0.5)


def test_scorer_reward_clips_penalises_short_completions_and_logs_monitors() -> None:
    cfg = load_config(None, ["ppo.backend=rloo", "ppo.score_clip=0.5", "ppo.length_penalty=0.1",
                             "generation.min_new_tokens=0", "ppo.min_length=3"])
    scorer = CallableScorer(lambda texts: [0.0 if "thanks" in t else 1.0 for t in texts])
    reward = ScorerReward(scorer, cfg, eos_token_ids=[0])
    logged: dict[str, list[float]] = {}
    out = reward(
        prompts=["p", "p", "p"],
        completions=[" thanks, the best day ever", " idiot", " thanks"],
        completion_ids=[[5, 6, 7], [9, 0], [5, 0]],  # 3 tokens; 1 + EOS; 1 + EOS
        log_metric=lambda k, v: logged.setdefault(k, []).append(v),
    )
    # scores 1, 0, 1 clipped to 0.5; the two 1-token completions miss 2 tokens each (EOS does not count)
    assert out == pytest.approx([0.5, 0.0 - 0.2, 0.5 - 0.2])
    assert logged["objective/scores"] == [pytest.approx(1 / 3)]  # clipped, before the length guard
    assert logged["objective/toxicity"] == [pytest.approx(1 / 3)]
    assert logged["env/length_penalty_rows"] == [pytest.approx(2 / 3)]
    assert {"env/distinct_1", "env/distinct_2", "env/repetition"} <= set(logged)
    # the exaggeration probe, per step: one completion in three gushes
    assert logged["env/exaggeration_share"] == [pytest.approx(1 / 3)]
    assert length_shortfall(torch.tensor([0, 2, 5]), 3).tolist() == [3, 1, 0]


def test_long_prompts_keep_their_end(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    long = "the customer wants a refund " * 20 + "summary"
    cut = truncate_prompts(tok, [long, "short one"], max_tokens=8)
    assert cut[1] == "short one"
    assert len(tok(cut[0])["input_ids"]) <= 8 and cut[0].endswith("summary")


def test_seq2seq_policy_is_refused_with_the_fix(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="supports causal LMs only.*use ppo.backend=ppo for seq2seq"):
        check_supported("rloo", is_seq2seq=True)
    cfg = make_cfg(tiny_models["t5"], "rloo")
    policy = Policy.load(cfg.model, cfg.lora)
    scorer = CallableScorer(summary_toxicity)
    with pytest.raises(ConfigError, match="ppo.backend 'rloo' supports causal LMs only"):
        train_trl(cfg, policy, scorer, prompts(8), tmp_path, lambda m, s: None)
    # given as a directory, the T5 is detected too (arch auto) and nothing is written
    with pytest.raises(ConfigError, match="ppo.backend 'grpo' supports causal LMs only"):
        train_trl(make_cfg(tiny_models["t5"], "grpo"), tiny_models["t5"], scorer, prompts(8), tmp_path, lambda m, s: None)
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------------------------- training


def _train(cfg: Config, out: Path) -> tuple[TrainResult, list[tuple[dict[str, float], int]], Policy, float]:
    """A fresh policy trained by train_trl: (result, the log calls, the trained policy, seconds)."""
    torch.manual_seed(cfg.seed)
    policy = Policy.load(cfg.model, cfg.lora)
    calls: list[tuple[dict[str, float], int]] = []
    t0 = time.perf_counter()
    result = train_trl(cfg, policy, CallableScorer(summary_toxicity), prompts(), out, lambda m, s: calls.append((m, s)))
    return result, calls, policy, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["rloo", "grpo"])
def test_training_raises_the_reward(backend: str, sharp_gpt2: Path, tmp_path: Path) -> None:
    cfg = make_cfg(sharp_gpt2, backend)
    result, calls, policy, seconds = _train(cfg, tmp_path)

    # one log call per rollout step, under our metric keys
    assert [s for _, s in calls] == list(range(1, 17))
    kl_key = "objective/kl"
    for metrics, _ in calls:
        assert {"objective/scores", "objective/toxicity", kl_key, "objective/kl_coef", "objective/entropy",
                "env/response_length", "env/distinct_2", "env/exaggeration_share", "loss/total"} <= set(metrics)
        assert metrics["objective/kl_coef"] == 0.05
    scores = [m["objective/scores"] for m, _ in calls]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.15, f"{backend}: mean reward did not rise: {[round(s, 2) for s in scores]}"
    toxicity = [m["objective/toxicity"] for m, _ in calls]
    assert sum(toxicity[-3:]) < sum(toxicity[:3])
    # the reference is the adapter-off base (TRL's "ref" adapter copy is gone): the KL of the first rollout,
    # measured by RLOO before any update, is 0 for a fresh LoRA; GRPO measures it during the updates
    assert list(policy.model.peft_config) == ["default"]
    if backend == "rloo":
        assert abs(calls[0][0][kl_key]) < 1e-4
    assert calls[0][0][kl_key] < 0.2 < calls[-1][0][kl_key]

    # the model lands in our artifact layout and loads back; the history matches what was logged
    assert result.steps == 16 and len(result.history) == 16
    assert result.history[-1]["objective/scores"] == pytest.approx(scores[-1])
    meta = json.loads((result.artifact_dir / "detoxflow.json").read_text())
    assert meta["arch"] == "causal" and meta["train"]["backend"] == backend
    assert (result.artifact_dir / "adapter" / "adapter_config.json").is_file()
    assert not (result.artifact_dir / "adapter" / "ref").exists()  # TRL's reference copy is not shipped
    loaded = Policy.from_artifact(result.artifact_dir, device="cpu")
    texts = loaded.generate_texts(prompts(8), cfg.generation.model_copy(update={"do_sample": False}))
    assert sum(t.count("summary") for t in texts) > 0
    assert result.checkpoint_dir is not None and result.checkpoint_dir.parent == tmp_path / "checkpoints"
    print(f"{backend}: 16 steps x 32 completions in {seconds:.1f}s; reward {first:.3f} -> {last:.3f}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["rloo", "grpo"])
def test_resume_reaches_the_weights_of_an_uninterrupted_run(backend: str, sharp_gpt2: Path, tmp_path: Path) -> None:
    # checkpoint_every=100: only the final step of each run is checkpointed, which is what a resume needs
    small = ("ppo.checkpoint_every=100", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2")
    three = make_cfg(sharp_gpt2, backend, "ppo.steps=3", *small)
    two = make_cfg(sharp_gpt2, backend, "ppo.steps=2", *small)
    full, _, _, _ = _train(three, tmp_path / "full")

    first, calls1, _, _ = _train(two, tmp_path / "split")
    assert [s for _, s in calls1] == [1, 2] and first.steps == 2
    second, calls2, _, _ = _train(three, tmp_path / "split")  # a fresh policy: the adapter comes from the checkpoint
    assert [s for _, s in calls2] == [3]
    assert second.steps == 3 and len(second.history) == 3
    assert second.history[:2] == first.history  # the logs of the first run come back from the checkpoint
    # optimizer, scheduler, sampler and RNG state all come back: bit-identical to the uninterrupted run
    a, b = _adapter(full.artifact_dir), _adapter(second.artifact_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(bool(v.abs().sum() > 0) for k, v in a.items() if "lora_B" in k)  # it did train

    # resume=False starts over: the old checkpoints are removed and step 1 is logged again
    calls3: list[int] = []
    torch.manual_seed(0)
    policy = Policy.load(two.model, two.lora)
    third = train_trl(two, policy, CallableScorer(summary_toxicity), prompts(), tmp_path / "split",
                      lambda m, s: calls3.append(s), resume=False)
    assert calls3 == [1, 2] and third.steps == 2


def _adapter(artifact_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(artifact_dir / "adapter" / "adapter_model.safetensors"))


def test_scoring_forwards_use_the_positions_generation_used(tiny_models: dict[str, Path]) -> None:
    """TRL scores left-padded rows without position_ids; under mask_position_ids a GPT-2 gives the logprobs of
    Policy.forward (which passes generate()'s positions), and the patch is gone afterwards."""
    from detoxflow.models.trl_backends import mask_position_ids

    cfg = make_cfg(tiny_models["gpt2"], "rloo")
    policy = Policy.load(cfg.model, cfg.lora)
    q, qm = policy.encode_queries(["person one", "the customer wants a refund because the order"], 32)
    assert not bool(qm[0].all())  # the short prompt is left-padded
    r, rm = policy.generate(q, qm, cfg.generation)
    expected, _, _ = policy.forward(q, qm, r, rm)
    ids, mask = torch.cat([q, r], 1), torch.cat([qm, rm.long()], 1)

    def trl_style() -> torch.Tensor:
        with torch.no_grad():
            logits = policy.model(input_ids=ids, attention_mask=mask).logits[:, q.shape[1] - 1 : -1]
        return logits.log_softmax(-1).gather(-1, r.unsqueeze(-1)).squeeze(-1) * rm

    assert not torch.allclose(trl_style()[0], expected[0], atol=1e-3)  # the bug the shim exists for
    with mask_position_ids(policy.model):
        assert torch.allclose(trl_style(), expected, atol=1e-5)
    assert "forward" not in policy.model.get_base_model().base_model.__dict__

"""Golden tests of the functional forward (models/fastpath/) against the HF module path it replaces.

One policy per test; ``policy.fast = None`` switches the same object (same parameters) to the HF path, so logits,
hidden states and gradients compare directly. The LoRA adapter gets a non-zero B (``randomise_lora``), so the
adapter-on and adapter-off passes differ. Tolerance: float32 rounding of differently fused kernels (SDPA vs the
HF attention, F.gelu vs GELU as separate ops): 1e-5 absolute on logits / logprobs (values 1e-5 relative).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from fastpath_checks import (
    TOL,
    batch,
    both,
    check_decoding_equals_full_forward,
    check_rollout_matches_hf,
    randomise_lora,
)

from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models.policy import Policy

ARCHS = ["gpt2", "t5"]


def load(tiny_models: dict[str, Path], arch: str, dropout: float = 0.0, **model_kw) -> Policy:
    torch.manual_seed(0)
    return Policy.load(ModelConfig(name_or_path=str(tiny_models[arch]), **model_kw),
                       LoraSection(r=4, alpha=8, dropout=dropout))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_is_chosen_and_logged(tiny_models, arch: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="detoxflow.models.policy"):
        policy = load(tiny_models, arch)
    assert policy.fast is not None and policy.fast.arch == arch
    assert any("forward path: fast path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_and_gradients_equal_hf(tiny_models, arch: str) -> None:
    """(a) adapter on, with grad: logits, last hidden state, trimmed length equal; the gradients of a PPO-like loss
    w.r.t. every LoRA A/B and the value head equal."""
    policy = load(tiny_models, arch)
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    params = policy.trainable_parameters()
    assert any("lora_A" in n for n, p in policy.model.named_parameters() if p.requires_grad)

    def run():
        logits, hidden, tr = policy._run(q, qm, r, rm, want_hidden=True)
        logprobs, values, entropy = policy.forward(q, qm, r, rm)
        loss = -(logprobs * torch.linspace(-1, 1, r.shape[1], device=r.device)).sum() + (values ** 2).mean() - 0.1 * entropy.sum()
        grads = torch.autograd.grad(loss, params)
        return logits.detach(), hidden.detach(), tr, [g.clone() for g in grads]

    (lf, hf, trf, gf), (lh, hh, trh, gh) = both(policy, run)
    assert trf == trh == r.shape[1]
    # compared where the HF path defines them: real query/response positions (both are real here by construction)
    torch.testing.assert_close(lf, lh, **TOL)
    torch.testing.assert_close(hf, hh, **TOL)
    assert len(gf) == len(gh) > 2
    for a, b in zip(gf, gh, strict=True):
        assert b.abs().max() > 0  # every trainable tensor gets a gradient (B non-zero, so A does too)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_forward_equals_hf_and_adapter_acts(tiny_models, arch: str) -> None:
    """(b) adapter off (the KL reference): logprobs equal the HF path's, and differ from adapter-on by far more."""
    policy = load(tiny_models, arch)
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)

    def run():
        with torch.no_grad(), policy.model.disable_adapter():
            logits, _, _ = policy._run(q, qm, r, rm, want_hidden=False)
        return logits, policy.ref_logprobs(q, qm, r, rm)

    (lf, rf), (lh, rh) = both(policy, run)
    torch.testing.assert_close(lf, lh, **TOL)
    torch.testing.assert_close(rf, rh, **TOL)
    with torch.no_grad():
        on, _, _ = policy.forward(q, qm, r, rm)
    assert (on - rf).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_full_forward(tiny_models, arch: str) -> None:
    """(c) the decode loop (static KV buffers, adapter on, not merged) fed the fixed responses: every step's logits
    and hidden state equal the HF full forward's at the positions inside the response mask."""
    check_decoding_equals_full_forward(load(tiny_models, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_matches_hf_rollout(tiny_models, arch: str) -> None:
    """The whole rollout (sampling merge, inference mode) on both paths: same tokens from the same seed, statistics
    within rounding."""
    check_rollout_matches_hf(load(tiny_models, arch), max_new_tokens=12)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_dropout_is_off_in_every_pass(tiny_models, arch: str) -> None:
    """LoRA dropout 0.3 configured: no pass applies it (PPO's ratio compares the training forward with the rollout).
    The fast path still serves the model; in train mode both paths give the same outputs and gradients whatever
    the seed, equal to the eval-mode forward."""
    policy = load(tiny_models, arch, dropout=0.3)
    assert policy.fast is not None
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    policy.set_train(True)
    params = policy.trainable_parameters()

    def run(seed: int = 11):
        torch.manual_seed(seed)
        logprobs, values, _ = policy.forward(q, qm, r, rm, with_entropy=False)
        grads = torch.autograd.grad(logprobs.sum() + values.sum(), params)
        return logprobs.detach(), [g.clone() for g in grads]

    (lf, gf), (lh, gh) = both(policy, run)
    torch.testing.assert_close(lf, lh, **TOL)
    for a, b in zip(gf, gh, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    other, _ = run(12)
    assert torch.equal(other, lf)  # another seed, the same numbers: nothing is dropped
    policy.set_train(False)
    with torch.no_grad():
        ev, _, _ = policy.forward(q, qm, r, rm)
    torch.testing.assert_close(ev, lf, **TOL)  # no-grad kernels differ in rounding only


@pytest.mark.parametrize("arch", ARCHS)
def test_train_mode_without_lora_dropout_is_deterministic_on_both_paths(tiny_models, arch: str) -> None:
    """Base dropout is off in train mode on both paths, including T5's attention-probability dropout, which HF
    reads from a float (config.dropout_rate = 0.1 in these test models) rather than an nn.Dropout."""
    policy = load(tiny_models, arch)
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    policy.set_train(True)

    def run():
        with torch.no_grad():
            return [policy.forward(q, qm, r, rm)[0] for _ in range(2)]

    (f1, f2), (h1, h2) = both(policy, run)
    assert torch.equal(f1, f2) and torch.equal(h1, h2)
    torch.testing.assert_close(f1, h1, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_unsupported_config_falls_back_to_hf_and_says_so(tiny_models, arch: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="detoxflow.models.policy"):
        policy = load(tiny_models, arch, dtype="bfloat16")
    assert policy.fast is None
    msgs = [r.getMessage() for r in caplog.records if "forward path" in r.getMessage()]
    assert len(msgs) == 1 and "HF modules" in msgs[0] and "float32" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detoxflow.models.policy"):
        off = load(tiny_models, arch, fast_path="off")
    assert off.fast is None
    assert any("model.fast_path=off" in r.getMessage() for r in caplog.records)
    q, qm, r, rm = batch(off)
    with torch.no_grad():
        lp, _, _ = off.forward(q, qm, r, rm)
    assert torch.all(lp[rm] < 0)


def test_gradient_checkpointing_is_refused(tiny_models) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from detoxflow.models.fastpath import build

    base = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    base.gradient_checkpointing_enable()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    fast, reason = build(model)
    assert fast is None and "gradient checkpointing" in reason


@pytest.mark.parametrize(("arch", "targets", "why"), [("gpt2", ["c_attn", "wte"], "embedding"),
                                                    ("t5", ["q", "v", "lm_head"], "lm_head")])
def test_lora_outside_the_linears_is_refused(tiny_models, arch: str, targets: list[str], why: str) -> None:
    """LoRA on a module the functional forward does not route through its LoRA linear would be silently dropped:
    refused instead; the same model with only the attention targets is accepted."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from detoxflow.models.fastpath import build
    from detoxflow.models.policy import _disable_dropout

    cls = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    for tg, ok in ((targets, False), (targets[:-1], True)):
        model = get_peft_model(cls.from_pretrained(tiny_models[arch]), LoraConfig(r=4, target_modules=tg, fan_in_fan_out=arch == "gpt2"))
        _disable_dropout(model)
        fast, reason = build(model)
        assert (fast is not None) == ok, reason
        if not ok:
            assert why in reason


def test_fast_path_setting_is_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fast_path"):
        ModelConfig(fast_path="on")


@pytest.mark.parametrize("variant", ["gated-gelu-untied", "gpt2-tanh-unscaled"])
def test_config_variants_equal_hf(tiny_models, tmp_path: Path, variant: str) -> None:
    """The branches the shared tiny models do not take: T5 v1.1 / flan-T5 style (gated-gelu feed-forward, untied
    LM head, so no d_model**-0.5 rescaling) and GPT-2 with gelu_pytorch_tanh, unscaled attention scores scaled
    by the inverse layer index instead. Training forward and decode loop against the HF path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    arch = "t5" if variant.startswith("gated") else "gpt2"
    cfg = AutoConfig.from_pretrained(tiny_models[arch])
    if arch == "t5":
        cfg.feed_forward_proj, cfg.dense_act_fn, cfg.is_gated_act = "gated-gelu", "gelu_new", True
        cfg.tie_word_embeddings, cfg.scale_decoder_outputs = False, False
        torch.manual_seed(4)
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        cfg.activation_function, cfg.scale_attn_weights, cfg.scale_attn_by_inverse_layer_idx = "gelu_pytorch_tanh", False, True
        torch.manual_seed(4)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_models[arch]).save_pretrained(tmp_path)
    policy = load({arch: tmp_path}, arch)
    assert policy.fast is not None
    if arch == "t5":
        base = policy.model.get_base_model()
        assert base.lm_head.weight.data_ptr() != base.shared.weight.data_ptr() and policy.fast.scale_out is None
        assert policy.fast.dec_blocks[0].wi_0 is not None and policy.fast.dec_blocks[0].wi is None
    else:
        assert [b.scale for b in policy.fast.blocks] == [1.0, 0.5]
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)

    def run():
        with torch.no_grad():
            logits, hidden, _ = policy._run(q, qm, r, rm, want_hidden=True)
        torch.manual_seed(3)
        roll = policy.rollout(q, qm, GenerationConfig(max_new_tokens=8, min_new_tokens=8))
        return logits, hidden, roll

    (lf, hf, rf), (lh, hh, rh) = both(policy, run)
    torch.testing.assert_close(lf, lh, **TOL)
    torch.testing.assert_close(hf, hh, **TOL)
    assert torch.equal(rf.response_ids, rh.response_ids)
    torch.testing.assert_close(rf.logprobs, rh.logprobs, **TOL)


def test_categorical_sampler_matches_the_distribution() -> None:
    """The inverse-CDF sampler of the rollout: frequencies within 4 standard errors of the probabilities over
    200k draws, zero-probability entries (first, middle, last) never drawn, one-hot rows always their token."""
    from detoxflow.models.policy import categorical

    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    n = 200_000
    draws = torch.stack([categorical(probs) for _ in range(20)], 1)
    assert torch.all(draws[1] == 5)
    big = probs[:1].expand(n, -1)
    picks = categorical(big)
    freq = torch.bincount(picks, minlength=6).double() / n
    se = (probs[0].double() * (1 - probs[0].double()) / n).sqrt()
    assert torch.all((freq - probs[0].double()).abs() <= 4 * se + 1e-12), freq
    assert freq[0] == freq[2] == freq[5] == 0

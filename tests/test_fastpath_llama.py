"""Golden tests of the Llama-family fast path (models/fastpath/llama.py) against the HF modules it replaces.

Random-weight models built here with the shapes of four real configs, shrunk in depth to 2 layers (and in
width where a layer would be slow, keeping the query / key-value head ratio and the head size): SmolLM-135M
(9 / 3 heads, tied head), Qwen2.5-0.5B (q/k/v bias, 14 / 2 heads, tied), Llama-3.2-1B (``llama3`` RoPE scaling,
tied), Mistral-7B v0.3 (untied head, head size 128). Their tokenizer has no pad token, as Llama tokenizers ship:
the policy pads with EOS, on the left. LoRA sits on all seven projections. Helpers and tolerances as in
tests/fastpath_checks.py (``policy.fast = None`` switches the same policy to the HF path).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
from fastpath_checks import (
    PROMPTS,
    TOL,
    batch,
    both,
    check_decoding_equals_full_forward,
    check_rollout_matches_hf,
    randomise_lora,
)

from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models.policy import Policy, response_mask_from_eos

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# name -> (config class, shape); real values except num_hidden_layers (2) and the widths noted
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm-135m": ("LlamaConfig", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                        intermediate_size=1536, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                        max_position_embeddings=2048)),
    # intermediate 4864 -> 2432
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                         intermediate_size=2432, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                         max_position_embeddings=32768, use_sliding_window=False)),
    # 2048 wide, 32 / 8 heads -> 512, 8 / 2 (head size 64 kept), intermediate 8192 -> 2048
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                         intermediate_size=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                         rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)),
    # 4096 wide, 32 / 8 heads -> 512, 4 / 1 (head size 128 kept), intermediate 14336 -> 1792
    "mistral-7b": ("MistralConfig", dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                                         intermediate_size=1792, tie_word_embeddings=False, rms_norm_eps=1e-5,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                         max_position_embeddings=32768, sliding_window=None)),
}
NAMES = list(SHAPES)


@functools.cache
def _tokenizer_json() -> str:
    from conftest import _train_tokenizer

    return _train_tokenizer(["<s>", "</s>", "<unk>"]).to_str()


def build_model(root: Path, name: str, **changes) -> Path:
    """Save a random-weight 2-layer model of ``SHAPES[name]`` (with ``changes``) and a pad-less tokenizer."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token is None
    cls_name, shape = SHAPES[name]
    # vocabulary rows to spare, as real checkpoints have: transformers loads a qwen2 folder's tokenizer as
    # Qwen2Tokenizer, which adds its pad token <|endoftext|> after the trained ones
    cfg = getattr(transformers, cls_name)(vocab_size=len(tok) + 16, num_hidden_layers=2, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, **{**shape, **changes})
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg)
    out = root / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-family")
    return {name: build_model(root, name) for name in NAMES}


def load(path: Path, dropout: float = 0.0, targets: list[str] | None = TARGETS, **model_kw) -> Policy:
    torch.manual_seed(0)
    return Policy.load(ModelConfig(name_or_path=str(path), **model_kw),
                       LoraSection(r=4, alpha=8, dropout=dropout, target_modules=targets))


def test_shapes_are_the_real_ones(llama_models) -> None:
    """The built models have the geometry the test names claim: GQA ratios, biases, tying, RoPE type."""
    got = {}
    for name, path in llama_models.items():
        base = load(path).model.get_base_model()
        a = base.model.layers[0].self_attn
        got[name] = (type(base).__name__, base.config.num_attention_heads, base.config.num_key_value_heads, a.head_dim,
                     a.q_proj.base_layer.bias is not None, base.lm_head.weight is base.model.embed_tokens.weight,
                     base.model.rotary_emb.rope_type)
    assert got == {
        "smollm-135m": ("LlamaForCausalLM", 9, 3, 64, False, True, "default"),
        "qwen2.5-0.5b": ("Qwen2ForCausalLM", 14, 2, 64, True, True, "default"),
        "llama-3.2-1b": ("LlamaForCausalLM", 8, 2, 64, False, True, "llama3"),
        "mistral-7b": ("MistralForCausalLM", 4, 1, 128, False, False, "default"),
    }


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_is_chosen_and_logged(llama_models, name: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="detoxflow.models.policy"):
        policy = load(llama_models[name])
    assert policy.fast is not None and policy.fast.arch == policy.model.get_base_model().config.model_type
    assert any("forward path: fast path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", NAMES)
def test_training_forward_and_gradients_equal_hf(llama_models, name: str) -> None:
    """Adapter on, with grad, LoRA on q/k/v/o/gate/up/down: logits and last hidden state equal over left-padded
    queries and rows that end early; the gradients of a PPO-like loss w.r.t. every LoRA A/B and the value head
    equal."""
    policy = load(llama_models[name])
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    params = policy.trainable_parameters()
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert {t for t in TARGETS if any(f".{t}.lora_A" in n for n in names)} == set(TARGETS)

    def run():
        logits, hidden, tr = policy._run(q, qm, r, rm, want_hidden=True)
        logprobs, values, entropy = policy.forward(q, qm, r, rm)
        loss = -(logprobs * torch.linspace(-1, 1, r.shape[1])).sum() + (values ** 2).mean() - 0.1 * entropy.sum()
        return logits.detach(), hidden.detach(), tr, [g.clone() for g in torch.autograd.grad(loss, params)]

    (lf, hf, trf, gf), (lh, hh, trh, gh) = both(policy, run)
    assert trf == trh == r.shape[1]
    torch.testing.assert_close(lf, lh, **TOL)
    torch.testing.assert_close(hf, hh, **TOL)
    assert len(gf) == len(gh) == 2 * 2 * len(TARGETS) + 2
    for a, b in zip(gf, gh, strict=True):
        # relative to the tensor's scale: at these widths gradients reach ~1e3 (value head N(0, 1)), and float32
        # sums in another order differ by ~1e-6 of that
        assert b.abs().max() > 0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_reference_forward_equals_hf_and_adapter_acts(llama_models, name: str) -> None:
    policy = load(llama_models[name])
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    (rf,), (rh,) = both(policy, lambda: (policy.ref_logprobs(q, qm, r, rm),))
    torch.testing.assert_close(rf, rh, **TOL)
    with torch.no_grad():
        on, _, _ = policy.forward(q, qm, r, rm)
    assert (on - rf).abs().max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_incremental_decoding_equals_full_forward(llama_models, name: str) -> None:
    """The decode loop (static K/V buffers of the key/value heads, RoPE positions counting real tokens) fed fixed
    responses: every step's logits and hidden state equal the HF full forward's inside the response mask."""
    check_decoding_equals_full_forward(load(llama_models[name]))


@pytest.mark.parametrize("name", NAMES)
def test_rollout_matches_hf_rollout(llama_models, name: str) -> None:
    """The whole rollout (sampling merge, inference mode) on both paths: same tokens from the same seed,
    statistics within rounding; the training forward scores the sampled tokens as the rollout did."""
    check_rollout_matches_hf(load(llama_models[name]), max_new_tokens=10)


def test_no_dropout_in_any_pass(llama_models) -> None:
    """LoRA dropout 0.3, train mode: the fast path's training forward is deterministic and equals the eval-mode
    forward and the HF path's eval-mode forward (no pass applies dropout, LoRA's included)."""
    policy = load(llama_models["smollm-135m"], dropout=0.3)
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    with torch.no_grad():
        policy.set_train(True)
        torch.manual_seed(1)
        t1, _, _ = policy.forward(q, qm, r, rm)
        torch.manual_seed(2)
        t2, _, _ = policy.forward(q, qm, r, rm)
        policy.set_train(False)
        ev, _, _ = policy.forward(q, qm, r, rm)
        policy.fast, fast = None, policy.fast
        hf, _, _ = policy.forward(q, qm, r, rm)
        policy.fast = fast
    assert torch.equal(t1, t2) and torch.equal(t1, ev)
    torch.testing.assert_close(t1, hf, **TOL)


@pytest.mark.parametrize("name", ["smollm-135m", "mistral-7b"])
def test_eos_padding_is_not_an_end_of_response(llama_models, name: str) -> None:
    """No pad token: the policy pads queries with EOS on the left. That padding is invisible (each row scores as
    it does alone, unpadded, on the training forward and the decode loop) and is not read as the end of a
    response: a response's first EOS is kept and scored, the pad (= EOS) tokens after it are masked."""
    policy = load(llama_models[name])
    tok = policy.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    randomise_lora(policy)
    q, qm, r, rm = batch(policy)
    assert bool((q[qm == 0] == tok.eos_token_id).all()) and (qm == 0).any()
    # row 0 ends at 3: the EOS is in the mask, what follows is pad (= EOS) and masked out
    assert r[0, 3] == tok.eos_token_id and rm[0, :4].all() and not rm[0, 4:].any()
    assert torch.equal(response_mask_from_eos(r, tok.eos_token_id), rm)
    with torch.no_grad():
        lp, _, _ = policy.forward(q, qm, r, rm)
        assert lp[0, 3] < 0 and torch.all(lp[0, 4:] == 0)
        for i in range(len(PROMPTS)):
            keep = qm[i].bool()
            qi, qmi = q[i : i + 1, keep], qm[i : i + 1, keep]
            lpi, _, _ = policy.forward(qi, qmi, r[i : i + 1], rm[i : i + 1])
            torch.testing.assert_close(lpi[0], lp[i], **TOL)
            step = policy._decode_steps(policy.model.get_base_model(), qi, qmi, 1)
            alone, _ = next(step)
            step.close()
            step = policy._decode_steps(policy.model.get_base_model(), q, qm, 1)
            padded, _ = next(step)
            step.close()
            torch.testing.assert_close(alone[0], padded[i], **TOL)
    torch.manual_seed(5)
    roll = policy.rollout(q, qm, GenerationConfig(max_new_tokens=12, min_new_tokens=3, do_sample=True))
    # EOS banned for 3 tokens: every row, padded or not, has at least 3 response tokens
    assert torch.all(roll.response_mask.sum(1) >= 3)
    assert torch.equal(roll.response_mask, response_mask_from_eos(roll.response_ids, tok.eos_token_id))


@pytest.mark.parametrize(("name", "changes", "why"), [
    ("mistral-7b", {"sliding_window": 4096}, "sliding-window attention (sliding_window=4096)"),
    ("qwen2.5-0.5b", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, "sliding-window"),
    ("smollm-135m", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "RoPE scaling 'dynamic'"),
    ("smollm-135m", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_configs_keep_the_hf_path_and_say_why(tmp_path, name: str, changes: dict, why: str, caplog) -> None:
    path = build_model(tmp_path, name, **changes)
    with caplog.at_level(logging.INFO, logger="detoxflow.models.policy"):
        policy = load(path, targets=None)
    assert policy.fast is None
    msgs = [r.getMessage() for r in caplog.records if "forward path" in r.getMessage()]
    assert len(msgs) == 1 and "HF modules" in msgs[0] and why in msgs[0], msgs
    q, qm, r, rm = batch(policy)
    with torch.no_grad():
        lp, _, _ = policy.forward(q, qm, r, rm)
    assert torch.all(lp[rm] < 0)

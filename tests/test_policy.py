"""Behaviour of the Policy on tiny random-weight T5 and GPT-2 models (fixture `tiny_models`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models.policy import Policy, response_mask_from_eos

ARCHS = ["t5", "gpt2"]
PROMPTS = [
    "the customer wants a refund",
    "person one asks the manager about the friday meeting report because the order arrived late",
    "thanks",
]
GEN = GenerationConfig(max_new_tokens=10, min_new_tokens=2, do_sample=True, top_k=0, top_p=1.0)


def load(tiny_models: dict[str, Path], arch: str, **model_kw) -> Policy:
    torch.manual_seed(0)
    return Policy.load(ModelConfig(name_or_path=str(tiny_models[arch]), **model_kw), LoraSection(r=4, alpha=8))


def randomise_lora(policy: Policy, seed: int = 1, trained_like: bool = False) -> None:
    """LoRA B starts at zero (adapter = identity); give it weight so adapter on/off can differ. ``trained_like``:
    keep A's init and give B the size a trained adapter has (the LoRA update a fraction of the base weight)
    rather than LoRA weights that swamp the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name and trained_like:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_" in name and not trained_like:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        policy.value_head.weight.copy_(torch.randn(policy.value_head.weight.shape, generator=g))


def rollout(policy: Policy, gen: GenerationConfig = GEN):
    q, qm = policy.encode_queries(PROMPTS, 64)
    torch.manual_seed(3)
    r, rm = policy.generate(q, qm, gen)
    return q, qm, r, rm


def test_response_mask_includes_first_eos_only() -> None:
    ids = torch.tensor([[5, 6, 1, 7, 1], [1, 0, 0, 0, 0], [4, 4, 4, 4, 4]])
    mask = response_mask_from_eos(ids, eos_token_id=1)
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False], [True] * 5]


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_side_and_lora_targets(tiny_models, arch: str) -> None:
    policy = load(tiny_models, arch)
    q, qm = policy.encode_queries(PROMPTS, 64)
    short = qm[2]
    if arch == "t5":
        assert policy.is_seq2seq and short[0] == 1 and short[-1] == 0  # right padded
        expected = {"q", "v"}
    else:
        assert not policy.is_seq2seq and short[0] == 0 and short[-1] == 1  # left padded
        expected = {"c_attn"}
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in policy.model.named_parameters() if "lora_A" in n}
    assert wrapped == expected
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_off_logits_equal_plain_base_model(tiny_models, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    policy = load(tiny_models, arch)
    randomise_lora(policy)
    q, qm, r, rm = rollout(policy)
    cls = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    plain = cls.from_pretrained(tiny_models[arch]).eval()
    with torch.no_grad():
        if arch == "t5":
            start = torch.zeros_like(r[:, :1])
            logits = plain(input_ids=q, attention_mask=qm, decoder_input_ids=torch.cat([start, r[:, :-1]], 1)).logits
        else:
            ids, mask = torch.cat([q, r], 1), torch.cat([qm, rm.long()], 1)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, q.shape[1] - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(-1, r.unsqueeze(-1)).squeeze(-1) * rm
    ref = policy.ref_logprobs(q, qm, r, rm)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        on, _, _ = policy.forward(q, qm, r, rm)
    assert (on - ref).abs().max() > 1e-2  # the adapter does act when enabled


@pytest.mark.parametrize("arch", ARCHS)
def test_kl_is_zero_before_first_update(tiny_models, arch: str) -> None:
    """Fresh adapter (B = 0): adapter-on and adapter-off logprobs are bit-identical, on the default (fast) path."""
    policy = load(tiny_models, arch)
    assert policy.fast is not None
    q, qm, r, rm = rollout(policy)
    with torch.no_grad():
        logprobs, values, entropy = policy.forward(q, qm, r, rm)
    ref = policy.ref_logprobs(q, qm, r, rm)
    assert torch.equal(logprobs, ref)
    assert logprobs.shape == values.shape == entropy.shape == r.shape
    assert torch.all(logprobs[rm] < 0) and torch.all(logprobs[~rm] == 0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("gen", [GEN, GenerationConfig(max_new_tokens=12, min_new_tokens=12, temperature=0.7),
                                 GenerationConfig(max_new_tokens=8, min_new_tokens=0, top_k=20, top_p=0.9)],
                         ids=["sample", "fixed-length-temperature", "top-k-top-p"])
def test_rollout_statistics_equal_the_full_forward(tiny_models, arch: str, gen: GenerationConfig) -> None:
    """The logprobs, values and entropy the sampling loop collects are what PPO's full forward computes for the
    same tokens under the rollout's filter (EOS ban, top-k/top-p kept set): equal within float rounding, zero
    outside the mask; and they are the filtered distribution's, not the unfiltered softmax's."""
    policy = load(tiny_models, arch)
    randomise_lora(policy, trained_like=True)
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in policy.model.named_parameters() if "lora_" not in n}
    q, qm = policy.encode_queries(PROMPTS, 64)
    torch.manual_seed(3)
    roll = policy.rollout(q, qm, gen)
    for n, p in policy.model.named_parameters():  # the LoRA merged for sampling is gone: same tensors, same bits
        if n in base:
            assert p.data_ptr() == base[n][0] and torch.equal(p, base[n][1]), n
    torch.manual_seed(3)
    r, rm = policy.generate(q, qm, gen)
    assert torch.equal(roll.response_ids, r) and torch.equal(roll.response_mask, rm)  # one loop, same draws
    assert roll.response_mask.sum(1).min() >= min(gen.min_new_tokens + 1, gen.max_new_tokens)
    with torch.no_grad():
        lp, v, ent = policy.forward(q, qm, r, rm, temperature=gen.temperature, sampled_from=roll.sampled_from)
        unfiltered, _, _ = policy.forward(q, qm, r, rm, temperature=gen.temperature)
    ref = policy.ref_logprobs(q, qm, r, rm, temperature=gen.temperature, sampled_from=roll.sampled_from)
    assert (lp - ref).abs().max() > 1e-2  # the adapter acts
    assert torch.isfinite(ref).all()  # the reference scores the policy's kept set: no -inf
    torch.testing.assert_close(roll.logprobs, lp, rtol=0, atol=1e-5)
    # every case filters (EOS banned at the first min_new_tokens positions; top-k/top-p): renormalised over fewer
    # tokens, each sampled token is at least as likely as under the unfiltered softmax, and visibly so
    assert torch.all(lp >= unfiltered - 1e-6)
    assert (lp - unfiltered).abs().max() > 1e-4
    # randomise_lora gives the value head N(0, 1) weights: values of order 1-10, rounding shows at 1e-5 relative
    torch.testing.assert_close(roll.values, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roll.entropy, ent, rtol=0, atol=1e-5)
    for x in (roll.logprobs, roll.values, roll.entropy):
        assert x.shape == r.shape and torch.all(x[~rm] == 0)
    assert not roll.logprobs.is_inference() and not roll.values.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_merges_lora_only_under_the_size_limit(tiny_models, arch: str, monkeypatch) -> None:
    """Sampling with the LoRA merged (tiny weights) and with the LoRA branches (over the copy limit) draw the same
    tokens from the same seed and agree on the statistics; the merge really swaps weights while it lasts."""
    import detoxflow.models.sampling as sampling_module

    policy = load(tiny_models, arch, fast_path="off")  # the check below hooks the HF modules
    randomise_lora(policy, trained_like=True)
    q, qm = policy.encode_queries(PROMPTS, 64)
    gen = GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    seen: list[bool] = []
    layer = next(m for m in policy.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    original = layer.get_base_layer().weight.data_ptr()
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.get_base_layer().weight.data_ptr() == original))
    try:
        merged = policy.rollout(q, qm, gen)
        assert seen and not any(seen)  # a merged copy was in place while sampling
        seen.clear()
        monkeypatch.setattr(sampling_module, "MERGE_LORA_MAX_BYTES", 0)
        plain = policy.rollout(q, qm, gen)
        assert seen and all(seen)
    finally:
        hook.remove()
    assert layer.get_base_layer().weight.data_ptr() == original
    assert torch.equal(merged.response_ids, plain.response_ids)
    torch.testing.assert_close(merged.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.values, plain.values, rtol=1e-5, atol=1e-5)


def test_sample_token_filters_like_hf() -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from detoxflow.models.policy import sample_token

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in ((5, 1.0), (0, 0.8), (10, 0.5)):
        scores = logits.clone()
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        allowed = torch.isfinite(scores)
        torch.manual_seed(0)
        picks = torch.stack([sample_token(logits, True, top_k, top_p) for _ in range(200)], 1)  # (64, 200)
        assert torch.all(allowed.gather(1, picks))  # never a filtered token
        assert allowed.sum() > 64  # and the filter left a choice
    assert torch.equal(sample_token(logits, False), logits.argmax(-1))
    banned = sample_token(logits, False, ban=int(logits[0].argmax()))
    assert banned[0] != logits[0].argmax()


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_forward_equals_row_by_row(tiny_models, arch: str) -> None:
    """Padding (left for causal, right for T5, and after EOS) must not change any row's logprobs or values."""
    policy = load(tiny_models, arch)
    randomise_lora(policy)
    q, qm, r, rm = rollout(policy)
    with torch.no_grad():
        lp, v, _ = policy.forward(q, qm, r, rm)
        for i, prompt in enumerate(PROMPTS):
            qi, qmi = policy.encode_queries([prompt], 64)
            n = int(rm[i].sum())
            lpi, vi, _ = policy.forward(qi, qmi, r[i : i + 1, :n], rm[i : i + 1, :n])
            torch.testing.assert_close(lp[i, :n], lpi[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v[i, :n], vi[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_argmax_of_forward(tiny_models, arch: str) -> None:
    """The tokens generate() picks greedily are the argmax of the scoring forward: one model, same positions."""
    policy = load(tiny_models, arch)
    randomise_lora(policy)
    greedy = GenerationConfig(max_new_tokens=8, min_new_tokens=0, do_sample=False)
    q, qm = policy.encode_queries(PROMPTS, 64)
    r, rm = policy.generate(q, qm, greedy)
    with torch.no_grad():
        logits, _, tr = policy._run(q, qm, r, rm, want_hidden=False)
    assert torch.equal(logits.argmax(-1)[rm[:, :tr]], r[:, :tr][rm[:, :tr]])
    for i, prompt in enumerate(PROMPTS):  # batched (padded) greedy decoding == one prompt at a time
        qi, qmi = policy.encode_queries([prompt], 64)
        ri, rmi = policy.generate(qi, qmi, greedy)
        assert torch.equal(ri[0][rmi[0]], r[i][rm[i]])


@pytest.mark.parametrize("arch", ARCHS)
def test_min_new_tokens_guard_and_eos_in_mask(tiny_models, arch: str) -> None:
    policy = load(tiny_models, arch, fast_path="off")  # the EOS bias below is a hook on the HF LM head
    eos = policy.eos_token_id
    bias = torch.zeros(len(policy.tokenizer))
    bias[eos] = 1e4  # make EOS the only likely token
    head = policy.model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: out + bias[: out.shape[-1]])
    try:
        q, qm = policy.encode_queries(PROMPTS, 64)
        r, rm = policy.generate(q, qm, GenerationConfig(max_new_tokens=8, min_new_tokens=0))
        assert rm.sum(1).tolist() == [1, 1, 1] and torch.all(r[:, 0] == eos)
        r, rm = policy.generate(q, qm, GenerationConfig(max_new_tokens=8, min_new_tokens=3))
        assert rm.sum(1).tolist() == [4, 4, 4]  # 3 forced tokens, then the EOS, which is part of the response
        assert torch.all(r[:, 3] == eos) and torch.all(r[:, :3] != eos)
        assert torch.all(r[~rm] == policy.pad_token_id)
    finally:
        hook.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_adapter_is_the_reference(tiny_models, arch: str, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    targets = ["q", "v"] if arch == "t5" else ["c_attn"]
    torch.manual_seed(5)
    sft = get_peft_model(cls.from_pretrained(tiny_models[arch]), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                           fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    sft.save_pretrained(tmp_path / "sft")

    policy = load(tiny_models, arch, sft_adapter=str(tmp_path / "sft"))
    q, qm, r, rm = rollout(policy)
    ref = policy.ref_logprobs(q, qm, r, rm)
    with torch.no_grad():
        logprobs, _, _ = policy.forward(q, qm, r, rm)
    torch.testing.assert_close(logprobs, ref)  # KL 0 against the SFT policy before any PPO update

    plain_sft = PeftModel.from_pretrained(cls.from_pretrained(tiny_models[arch]), str(tmp_path / "sft")).eval()
    bare = load(tiny_models, arch)
    policy_as_sft = Policy(plain_sft, bare.value_head, bare.tokenizer, bare.is_seq2seq, bare.device)
    with torch.no_grad():
        sft_lp, _, _ = policy_as_sft.forward(q, qm, r, rm)
    torch.testing.assert_close(ref, sft_lp, rtol=1e-5, atol=1e-5)
    assert (bare.ref_logprobs(q, qm, r, rm) - ref).abs().max() > 1e-2  # and it is not the bare base


@pytest.mark.parametrize("arch", ARCHS)
def test_artifact_round_trip(tiny_models, arch: str, tmp_path: Path) -> None:
    policy = load(tiny_models, arch)
    randomise_lora(policy)
    q, qm, r, rm = rollout(policy)
    with torch.no_grad():
        lp, v, _ = policy.forward(q, qm, r, rm)
    out = policy.save_artifact(tmp_path / "model", extra={"metrics": {"toxicity": 0.1}})
    for rel in ("adapter/adapter_config.json", "value_head.pt", "tokenizer", "base/config.json", "detoxflow.json"):
        assert (out / rel).exists(), rel
    meta = json.loads((out / "detoxflow.json").read_text())
    assert meta["arch"] == ("seq2seq" if arch == "t5" else "causal")
    assert meta["base"] == {"local": "base"} and meta["metrics"] == {"toxicity": 0.1}

    loaded = Policy.from_artifact(out)
    with torch.no_grad():
        lp2, v2, _ = loaded.forward(q, qm, r, rm)
    torch.testing.assert_close(lp2, lp)
    torch.testing.assert_close(v2, v)
    # saving over an existing artifact replaces it whole
    policy.save_artifact(tmp_path / "model", extra={"metrics": {"toxicity": 0.2}})
    assert json.loads((out / "detoxflow.json").read_text())["metrics"] == {"toxicity": 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    texts = loaded.generate_texts(PROMPTS, GenerationConfig(max_new_tokens=5, min_new_tokens=1, do_sample=False))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_bad_model_path_names_the_field(tmp_path: Path) -> None:
    from detoxflow.models.policy import PolicyError

    with pytest.raises(PolicyError, match="model.name_or_path"):
        Policy.load(ModelConfig(name_or_path=str(tmp_path / "nope")), LoraSection())

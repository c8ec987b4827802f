"""The embedded models: built once under a lock, cached by content hash, and warm-started so that they
summarise (ROUGE) and are measurably rude on heated dialogues (the toxicity PPO has to remove)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from detoxflow.config import DataConfig
from detoxflow.models import bootstrap
from detoxflow.models.data import build_prompt, load_split

PROJECT_ROOT = Path(__file__).resolve().parent.parent
N_TEST = 30
TINY = {"vocab_size": 300, "d_model": 32, "d_ff": 64, "layers": 1, "steps": 2, "batch_size": 8}


def _angry_lines() -> list[str]:
    spec = importlib.util.spec_from_file_location("generate_corpus", PROJECT_ROOT / "data" / "generate_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ANGRY


# ------------------------------------------------------------------------------------------ cache mechanics (fast)
@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """A private cache, a 200-dialogue corpus and tiny settings, so a build takes a second; counts the builds."""
    monkeypatch.setenv("DETOXFLOW_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "data"
    corpus.mkdir()
    for split in ("train", "validation", "test"):
        lines = (PROJECT_ROOT / "data" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (corpus / f"{split}.jsonl").write_text("".join(lines[:200]))
    monkeypatch.setenv("DETOXFLOW_DATA_DIR", str(corpus))
    monkeypatch.setitem(bootstrap.SETTINGS, "t5", bootstrap.with_settings("t5", **TINY))
    calls: list[Path] = []
    real_build = bootstrap.build

    def counting_build(settings, out_dir):
        calls.append(out_dir)
        time.sleep(0.5)  # widen the race window
        return real_build(settings, out_dir)

    monkeypatch.setattr(bootstrap, "build", counting_build)
    return tmp_path / "cache" / "embedded", calls


def test_concurrent_callers_build_once_atomically(tiny_cache):
    root, calls = tiny_cache
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(bootstrap.ensure_embedded("t5"))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1, "three concurrent callers must share one build"
    assert len(set(results)) == 1
    path = results[0]
    assert path.parent == root and path.name.startswith("t5-")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and (path / "bootstrap.json").is_file()
    assert [p.name for p in root.iterdir() if p.is_dir()] == [path.name], "no temporary build directory is left behind"
    assert bootstrap.resolve_model("embedded:t5") == str(path) and len(calls) == 1


def test_failed_build_leaves_nothing_behind(tiny_cache, monkeypatch):
    root, _ = tiny_cache

    def broken_build(settings, out_dir):
        (out_dir / "partial.bin").write_text("half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bootstrap, "build", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        bootstrap.ensure_embedded("t5")
    assert not [p for p in root.iterdir() if p.is_dir()]


def test_cache_key_covers_settings_and_corpus(tmp_path, monkeypatch):
    base = bootstrap.SETTINGS["t5"]
    h = bootstrap.build_hash(base)
    assert h == bootstrap.build_hash(bootstrap.with_settings("t5"))
    assert h != bootstrap.build_hash(bootstrap.with_settings("t5", steps=base.steps + 1))
    assert h != bootstrap.build_hash(bootstrap.SETTINGS["gpt2"])
    corpus = tmp_path / "data"
    corpus.mkdir()
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_bytes((PROJECT_ROOT / "data" / f"{split}.jsonl").read_bytes())
    monkeypatch.setenv("DETOXFLOW_DATA_DIR", str(corpus))
    assert bootstrap.build_hash(base) == h
    with (corpus / "train.jsonl").open("a") as f:
        f.write('{"id": "extra", "dialogue": "#Person1#: Hi", "summary": "A greeting.", "topic": "x"}\n')
    assert bootstrap.build_hash(base) != h, "a changed corpus must rebuild the models"


def test_resolve_model_passes_other_names_through():
    assert bootstrap.resolve_model("google/flan-t5-base") == "google/flan-t5-base"
    assert bootstrap.resolve_model("/some/local/dir") == "/some/local/dir"
    with pytest.raises(ValueError, match="embedded:t5, embedded:gpt2, embedded:llama"):
        bootstrap.resolve_model("embedded:bert")


def test_llama_build_loads_as_a_policy_on_the_fast_path(tiny_cache, monkeypatch):
    """The Llama-family embedded model at tiny settings: saved with grouped-query attention and a tokenizer
    without a pad token; the policy pads with EOS on the left and serves it through the Llama fast path."""
    from detoxflow.config import LoraSection, ModelConfig
    from detoxflow.models.policy import Policy

    monkeypatch.setitem(bootstrap.SETTINGS, "llama", bootstrap.with_settings("llama", **TINY, heads=4, kv_heads=2))
    path = bootstrap.ensure_embedded("llama")
    assert path.name.startswith("llama-")
    policy = Policy.load(ModelConfig(name_or_path="embedded:llama"), LoraSection(r=4, alpha=8))
    base = policy.model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert (base.config.num_attention_heads, base.config.num_key_value_heads) == (4, 2)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert policy.fast is not None and policy.fast.arch == "llama"
    tok = policy.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"


# ------------------------------------------------------------------------------------------ the real models (slow)
@pytest.fixture(scope="module")
def embedded() -> dict[str, Path]:
    """Both embedded models from the default cache (built on first use, ~1-2 minutes each on 2 cores)."""
    return {arch: bootstrap.ensure_embedded(arch) for arch in ("t5", "gpt2", "llama")}


@pytest.fixture(scope="module")
def test_records():
    return load_split(DataConfig(), "test", apply_caps=False)


def _greedy(path: Path, arch: str, prompts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # the Llama tokenizer, as the policy pads it
        tok.pad_token = tok.eos_token
    model = (AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM).from_pretrained(path).eval()
    out: list[str] = []
    for i in range(0, len(prompts), 16):
        enc = tok(prompts[i:i + 16], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=48, do_sample=False)
        if arch != "t5":
            ids = ids[:, enc["input_ids"].shape[1]:]  # left-padded prompt, then the continuation
        out += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_warm_started_model_summarises(embedded, test_records, arch):
    from rouge_score import rouge_scorer

    recs = test_records[:N_TEST]
    template = DataConfig().prompt_template
    summaries = _greedy(embedded[arch], arch, [build_prompt(template, r) for r in recs])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    own = sum(scorer.score(r.summary, s)["rougeL"].fmeasure for r, s in zip(recs, summaries)) / len(recs)
    refs = [r.summary for r in recs]
    random.Random(0).shuffle(refs)
    shuffled = sum(scorer.score(ref, s)["rougeL"].fmeasure for ref, s in zip(refs, summaries)) / len(recs)
    assert own > 0.5, f"{arch}: ROUGE-L {own:.3f} against its own references"
    assert own > shuffled + 0.25, f"{arch}: ROUGE-L own {own:.3f} vs shuffled {shuffled:.3f}: it is not reading the dialogue"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_warm_started_model_is_rude_on_heated_dialogues(embedded, test_records, arch):
    from profanity_check import predict_prob

    angry = _angry_lines()
    heated = [r for r in test_records if any(line in r.dialogue for line in angry)][:N_TEST]
    calm = [r for r in test_records if not any(line in r.dialogue for line in angry)][:N_TEST]
    template = DataConfig().prompt_template
    hot = predict_prob(_greedy(embedded[arch], arch, [build_prompt(template, r) for r in heated]))
    cool = predict_prob(_greedy(embedded[arch], arch, [build_prompt(template, r) for r in calm]))
    refs = predict_prob([r.summary for r in heated])
    assert hot.mean() > refs.mean() + 0.3, f"{arch}: heated P(toxic) {hot.mean():.3f} vs references {refs.mean():.3f}"
    assert cool.mean() < 0.2, f"{arch}: calm dialogues should get polite summaries, P(toxic) {cool.mean():.3f}"


@pytest.mark.slow
def test_cache_is_reused_and_cli_reports_it(embedded):
    for arch, path in embedded.items():
        start = time.perf_counter()
        assert bootstrap.ensure_embedded(arch) == path
        assert bootstrap.resolve_model(f"embedded:{arch}") == str(path)
        assert time.perf_counter() - start < 1.0, "a cached model must be found, not rebuilt"
    cli = Path(sys.executable).with_name("detoxflow")
    out = subprocess.run([str(cli), "bootstrap", "all"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert all(f"{arch}: {path}" in out for arch, path in embedded.items())


@pytest.mark.slow
def test_saved_layout_loads_with_generation_defaults(embedded):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    t5_tok = AutoTokenizer.from_pretrained(embedded["t5"])
    t5_gen = GenerationConfig.from_pretrained(embedded["t5"])
    assert t5_gen.decoder_start_token_id == t5_tok.pad_token_id and t5_gen.eos_token_id == t5_tok.eos_token_id
    assert t5_tok("#Person1#: Hi")["input_ids"][-1] == t5_tok.eos_token_id, "T5 inputs end with </s>"
    g_tok = AutoTokenizer.from_pretrained(embedded["gpt2"])
    assert g_tok.pad_token is not None and g_tok.pad_token_id != g_tok.eos_token_id
    assert AutoConfig.from_pretrained(embedded["gpt2"]).model_type == "gpt2"
    assert g_tok.convert_ids_to_tokens(g_tok("#Person2# says")["input_ids"])[0] == "#Person2#"
    l_tok = AutoTokenizer.from_pretrained(embedded["llama"])
    l_cfg = AutoConfig.from_pretrained(embedded["llama"])
    assert l_tok.pad_token is None and GenerationConfig.from_pretrained(embedded["llama"]).pad_token_id == l_tok.eos_token_id
    assert (l_cfg.model_type, l_cfg.num_attention_heads, l_cfg.num_key_value_heads) == ("llama", 6, 2)


def test_config_knows_every_embedded_model() -> None:
    from detoxflow.config import EMBEDDED_MODELS

    assert set(EMBEDDED_MODELS) == {bootstrap.EMBEDDED_PREFIX + arch for arch in bootstrap.SETTINGS}

"""Memory of PPO training: reference = the same model with the adapter disabled (detoxflow) vs a separate
frozen copy of the base model (what TRL 0.11's PPOTrainer and the course lab do).

Runs the real trainer (:func:`detoxflow.models.trainer.train`) for a few steps on random-weight models built
from configs, each variant in its own subprocess so that its peak RSS is clean, and prints one table:
parameter bytes held (base, copy, LoRA + value head) and peak RSS of the whole process.

usage: python benchmarks/memory.py [--sizes tiny small] [--archs t5 gpt2] [--steps 2] [--batch 8] [--new-tokens 32]
  tiny : d_model 128, 2 layers, vocab 2000 (the peer benchmark's tiny models)
  small: t5-small (d 512, 6+6 layers, vocab 32128) and gpt2 (d 768, 12 layers, vocab 50257) shapes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    ("t5", "tiny"): dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, vocab_size=2000),
    ("t5", "small"): dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, vocab_size=32128),
    ("gpt2", "tiny"): dict(n_embd=128, n_layer=2, n_head=4, vocab_size=2000),
    ("gpt2", "small"): dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
}


def build_model_dir(arch: str, size: str, out: Path) -> Path:
    """A random-weight model of the given shape + a word-level tokenizer whose vocabulary fills the model's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    shape = dict(SHAPES[(arch, size)])
    vocab_size = shape.pop("vocab_size")
    specials = ["<pad>", "</s>", "<unk>"] if arch == "t5" else ["<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if arch == "t5":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab_size, **shape, pad_token_id=0, eos_token_id=1,
                                                    decoder_start_token_id=0))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      unk_token="<unk>", pad_token="<|endoftext|>")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **shape, n_positions=512, bos_token_id=0,
                                           eos_token_id=0))
    path = out / f"{arch}-{size}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def child(model_dir: str, ref: str, steps: int, batch: int, new_tokens: int) -> dict[str, float]:
    """One training run in this process; returns its figures (printed as JSON by the caller)."""
    import torch

    from detoxflow.config import load_config
    from detoxflow.models.policy import Policy
    from detoxflow.models.ppo import logprobs_from_logits
    from detoxflow.models.reward import ScoreResult
    from detoxflow.models.trainer import train

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    class LengthScorer:
        """A reward that costs no memory: prefers shorter responses (any reward would do for memory)."""

        name = "length"

        def score(self, texts):
            tox = torch.tensor([min(1.0, len(t.split()) / new_tokens) for t in texts])
            return ScoreResult(1.0 - tox, tox)

    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "lora.r=8", "lora.alpha=16", f"generation.max_new_tokens={new_tokens}",
        f"generation.min_new_tokens={new_tokens}", "generation.top_k=0", f"ppo.steps={steps}",
        f"ppo.batch_size={batch}", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", f"ppo.checkpoint_every={steps}",
    ])
    policy = Policy.load(cfg.model, cfg.lora)
    base_bytes = sum(p.numel() * p.element_size() for n, p in policy.model.named_parameters() if "lora_" not in n)
    train_bytes = sum(p.numel() * p.element_size() for p in policy.trainable_parameters())
    copy_bytes = 0
    if ref == "copy":
        # the alternative design: a second, frozen model in memory that serves the reference logprobs
        frozen = type(policy.model.get_base_model()).from_pretrained(model_dir).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        copy_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters())
        wrapped = policy.model
        frozen.get_base_model = lambda: frozen  # what Policy._run asks a PeftModel for (the decoder start id)

        def ref_logprobs(query_ids, query_mask, response_ids, response_mask, temperature=1.0):
            policy.model = frozen  # the same forward code, pointed at the copy
            try:
                with torch.no_grad():
                    logits, _, tr = policy._run(query_ids, query_mask, response_ids, response_mask, want_hidden=False)
            finally:
                policy.model = wrapped
            lp = logprobs_from_logits(logits / temperature, response_ids[:, :tr])
            return torch.nn.functional.pad(lp, (0, response_ids.shape[1] - tr)) * response_mask

        policy.ref_logprobs = ref_logprobs  # type: ignore[method-assign]
    prompts = [" ".join(f"w{(i * 7 + j) % 1500 + 10}" for j in range(48)) for i in range(64)]
    out = tempfile.mkdtemp(prefix="memory-bench-")
    t0 = time.perf_counter()
    train(cfg, policy, LengthScorer(), prompts, out, lambda m, s: None, resume=False)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"base_mb": base_bytes / 2**20, "copy_mb": copy_bytes / 2**20, "trainable_mb": train_bytes / 2**20,
            "peak_rss_mb": peak_kb / 1024, "train_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--archs", nargs="+", default=["t5", "gpt2"], choices=["t5", "gpt2"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "REF"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], a.steps, a.batch, a.new_tokens)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-models-") as tmp:
        for size in a.sizes:
            for arch in a.archs:
                model_dir = build_model_dir(arch, size, Path(tmp))
                res = {}
                for ref in ("adapter", "copy"):
                    cmd = [sys.executable, __file__, "--child", str(model_dir), ref, "--steps", str(a.steps),
                           "--batch", str(a.batch), "--new-tokens", str(a.new_tokens)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not line:
                        sys.exit(f"{arch}/{size}/{ref} failed:\n{proc.stderr[-3000:]}")
                    res[ref] = json.loads(line[0][7:])
                rows.append((arch, size, res))

    head = (f"{'model':<12}{'base MB':>9}{'LoRA+VH MB':>11} | {'params MB adapter-off':>21}{'frozen copy':>12}"
            f"{'saved':>8} | {'peak RSS adapter-off':>21}{'frozen copy':>12}{'saved':>8}{'share':>7}")
    print(f"PPO training, {a.steps} steps, batch {a.batch}, {a.new_tokens} new tokens, LoRA r=8, float32, CPU")
    print(head)
    print("-" * len(head))
    for arch, size, r in rows:
        ad, cp = r["adapter"], r["copy"]
        p_ad = ad["base_mb"] + ad["trainable_mb"]
        p_cp = cp["base_mb"] + cp["copy_mb"] + cp["trainable_mb"]
        saved_rss = cp["peak_rss_mb"] - ad["peak_rss_mb"]
        print(f"{arch + '/' + size:<12}{ad['base_mb']:>9.1f}{ad['trainable_mb']:>11.2f} | {p_ad:>21.1f}{p_cp:>12.1f}"
              f"{p_cp - p_ad:>8.1f} | {ad['peak_rss_mb']:>21.0f}{cp['peak_rss_mb']:>12.0f}{saved_rss:>8.0f}"
              f"{saved_rss / cp['peak_rss_mb']:>6.0%}")
    print("params: bytes of parameters held in memory; the adapter-off reference saves exactly one base model's "
          "weights.\npeak RSS: whole process (Python, torch, activations, optimizer) - the saving is the same "
          "weights, a smaller share of the process.")


if __name__ == "__main__":
    main()

"""A/B of the sampling phase alone, in one process: HF ``generate`` (the old path) vs ``Policy.rollout``.

Runs each variant once to warm up, then ``--reps`` rounds that call every variant once, in the same order, and
prints the minimum and the median process CPU seconds per call. In-process interleaving with the minimum is
the least load-sensitive comparison on a shared machine: every variant sees the same load drift, and the
minimum is the call the other jobs disturbed least.

Variants: ``hf generate`` (``policy.model.generate`` with the settings the old ``Policy.generate`` passed;
tokens only), ``rollout, LoRA branches`` (the lean loop with merging switched off; tokens + logprobs, values,
entropy), ``rollout, LoRA merged`` (as the trainer runs it at tiny sizes), ``generate`` (``Policy.generate``:
the lean loop without statistics, as evaluation runs it).

Usage (project root, venv active; the models come from ``ppo_throughput.py``'s first run)::

    OMP_NUM_THREADS=1 python benchmarks/rollout_ab.py --arch t5 --size tiny --reps 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# run as a script, this folder is on sys.path: share the benchmark settings with ppo_throughput.py
from ppo_throughput import BATCH, LORA_TARGETS, NEW_TOKENS, PROMPT, cache_root


def variants(arch: str, size: str, models_dir: Path) -> dict[str, Callable[[], object]]:
    import detoxflow.models.sampling as sampling_module
    from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
    from detoxflow.models.policy import Policy

    policy = Policy.load(ModelConfig(name_or_path=str(models_dir / size / arch), device="cpu"),
                         LoraSection(r=8, alpha=16, dropout=0.05, target_modules=LORA_TARGETS[arch]))
    q, qm = policy.encode_queries([PROMPT.format(i=i) for i in range(BATCH)], 512)
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, top_p=1.0)
    hf_kwargs: dict[str, object] = {
        "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": True, "top_k": 0, "top_p": 1.0,
        "temperature": 1.0, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "use_cache": True,
        "pad_token_id": policy.pad_token_id, "eos_token_id": policy.eos_token_id,
    }
    if policy.is_seq2seq:
        hf_kwargs["decoder_start_token_id"] = policy._decoder_start_token_id

    def hf_generate() -> object:
        with torch.inference_mode():
            return policy.model.generate(input_ids=q, attention_mask=qm, **hf_kwargs)

    def rollout_unmerged() -> object:
        limit = sampling_module.MERGE_LORA_MAX_BYTES
        sampling_module.MERGE_LORA_MAX_BYTES = -1
        try:
            return policy.rollout(q, qm, gen)
        finally:
            sampling_module.MERGE_LORA_MAX_BYTES = limit

    def rollout_merged() -> object:
        limit = sampling_module.MERGE_LORA_MAX_BYTES
        sampling_module.MERGE_LORA_MAX_BYTES = 1 << 62
        try:
            return policy.rollout(q, qm, gen)
        finally:
            sampling_module.MERGE_LORA_MAX_BYTES = limit

    return {"hf generate": hf_generate, "rollout, LoRA branches": rollout_unmerged,
            "rollout, LoRA merged": rollout_merged, "generate (no statistics)": lambda: policy.generate(q, qm, gen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(LORA_TARGETS), default="t5")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models-dir", type=Path, default=None, help="default: <cache>/bench/models (ppo_throughput.py)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fns = variants(a.arch, a.size, a.models_dir or cache_root() / "models")
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.reps):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    for name, ts in times.items():
        print(f"{a.arch} {a.size} {name:26s} min {min(ts):.4f}  median {statistics.median(ts):.4f}  CPU s per call")


if __name__ == "__main__":
    main()

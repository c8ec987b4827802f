"""A/B of the functional forward (models/fastpath/, ``model.fast_path: auto``) against the HF module path
(``off``), in one process: the policy's three passes timed per call, interleaved, CPU time (min of ``--reps``).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/fastpath_ab.py --arch t5 --size tiny

Models: the benchmark's (``~/.cache/detoxflow/bench/models/<size>/<arch>``, built by ppo_throughput.py). Batch
16, exactly 32 sampled tokens, LoRA r=8 alpha=16 dropout 0.05 on the default targets; "fwd+bwd" is one
mini-batch of 4 in train mode, as the trainer's update does it (no pass applies dropout, LoRA's included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from detoxflow.config import GenerationConfig, LoraSection, ModelConfig
from detoxflow.models.policy import Policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["t5", "gpt2"], required=True)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache/detoxflow/bench/models"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    prompts = ["person one talks to person two about the meeting " * (1 + i % 4) for i in range(16)]
    gen = GenerationConfig(max_new_tokens=32, min_new_tokens=32, do_sample=True, top_k=0, top_p=1.0)
    calls: dict[str, dict[str, object]] = {}
    for fast_path in ("off", "auto"):
        torch.manual_seed(0)
        pol = Policy.load(ModelConfig(name_or_path=f"{a.models_dir}/{a.size}/{a.arch}", fast_path=fast_path),
                          LoraSection(r=8, alpha=16, dropout=0.05))
        q, qm = pol.encode_queries(prompts, 64)
        roll = pol.rollout(q, qm, gen)
        r, rm = roll.response_ids, roll.response_mask

        def fwd_bwd(pol: Policy = pol, q: torch.Tensor = q, qm: torch.Tensor = qm, r: torch.Tensor = r,
                    rm: torch.Tensor = rm) -> None:
            pol.set_train(True)
            lp, v, e = pol.forward(q[:4], qm[:4], r[:4], rm[:4])
            (lp.sum() + v.sum() + e.sum()).backward()
            pol.set_train(False)

        calls.setdefault("rollout", {})[fast_path] = lambda pol=pol, q=q, qm=qm: pol.rollout(q, qm, gen)
        calls.setdefault("ref fwd", {})[fast_path] = lambda pol=pol, q=q, qm=qm, r=r, rm=rm: pol.ref_logprobs(q, qm, r, rm)
        calls.setdefault("fwd+bwd (mini-batch 4)", {})[fast_path] = fwd_bwd
    # interleaved: each repeat times both paths back to back, so load changes hit both alike
    res: dict[tuple[str, str], list[float]] = {}
    for name, variants in calls.items():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(a.reps):
            for fast_path, fn in variants.items():
                t = time.process_time()
                fn()
                res.setdefault((fast_path, name), []).append(time.process_time() - t)
    for name in calls:
        off, fast = min(res[("off", name)]), min(res[("auto", name)])
        print(f"{a.arch} {a.size} {name}: HF {off * 1e3:.1f} ms, fast path {fast * 1e3:.1f} ms, x{off / fast:.2f}")


if __name__ == "__main__":
    main()

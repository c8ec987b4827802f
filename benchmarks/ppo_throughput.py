"""PPO throughput: detoxflow's PPO step vs the classic TRL 0.11 ``PPOTrainer`` and TRL 1.16's ``RLOOTrainer``, side
by side, in one invocation.

For every (arch, size) pair this script runs, one after the other on the same machine and the same model
directories:

- **ours**: a subprocess of this project's venv that calls the real training path,
  :func:`detoxflow.models.trainer.train`, for ``steps + 1`` PPO steps; the step time is the interval between
  consecutive calls of the trainer's ``log(metrics, step)`` callable (so it covers everything the loop does);
- **peer**: ``peer_trl011_ppo.py`` from the shared bench folder, in its own venv (trl 0.11.4,
  transformers 4.46.3, peft 0.13.2), which this script creates when it is missing;
- **rloo** (causal archs, ``--peers`` with ``rloo``): ``peer_trl116_rloo.py``, TRL 1.16's ``RLOOTrainer`` (what a TRL
  user picks today), in a second venv built the same way: 8 prompts x 2 completions = 16 samples per generation,
  4 optimizer steps of 4, KL beta 0.05 to the adapter-off reference; its samples/s is 16 / median generation cycle;
- optionally (``--floor``) ``floor.py``: the bare HF/PEFT calls every PPO step must make.

Same settings both sides: batch 16, mini-batch 4, 1 PPO epoch, exactly 32 new tokens (min = max = 32,
top_k 0, top_p 1), LoRA r=8 alpha=16 dropout 0.05 on q,v (T5) / c_attn (GPT-2) / q_proj,v_proj (Llama), adaptive KL from 0.2,
reward 1 - P(offensive) from alt-profanity-check, learning rate 1.41e-5, median step time with the first step
discarded as warm-up. Peak RSS of each side is read from outside, with ``os.wait4`` on its process.

Usage (from the project root, with the project venv active)::

    python benchmarks/ppo_throughput.py                          # tiny + small, t5 + gpt2, 3 timed steps
    python benchmarks/ppo_throughput.py --sizes tiny --archs gpt2 --steps 5 --floor
    python benchmarks/ppo_throughput.py --archs t5,gpt2,llama --threads 1 --clock cpu   # + TRL 1.16 RLOO (causal)
    python benchmarks/ppo_throughput.py --only ours --set ppo.ppo_epochs=2   # iterate on our side alone

Environment: ``DETOXFLOW_PEER_VENV`` (the peer venv, default ``<cache>/bench/peer-trl011``),
``DETOXFLOW_RLOO_VENV`` (the RLOO peer's venv, default ``<cache>/bench/peer-trl116``),
``DETOXFLOW_PEER_BENCH`` (the folder with the peer scripts, default ``../shared/bench`` next to the project),
``DETOXFLOW_CACHE`` (cache root, default ``~/.cache/detoxflow``; models are built under ``<cache>/bench/models``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detoxflow.atomic import atomic_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = "peer_trl011_ppo.py"
RLOO_SCRIPT = "peer_trl116_rloo.py"
FLOOR_SCRIPT = "floor.py"
MODELS_SCRIPT = "make_tiny_models.py"
# the peer's install lines: TRL 0.11 with the transformers / peft of its time; torch first so that pip does not
# pick another build
PEER_PIP = (
    ["torch==2.13.0"],
    ["trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1", "rich", "alt-profanity-check"],
)
PEER_CHECK = (
    "import trl, transformers, peft, torch, profanity_check; "
    "assert trl.__version__ == '0.11.4', trl.__version__; "
    "assert transformers.__version__ == '4.46.3', transformers.__version__"
)
# the RLOO peer's install lines (its README): TRL 1.16 with current transformers / peft
RLOO_PIP = (["torch==2.13.0"], ["trl==1.16.0", "peft", "datasets", "accelerate", "alt-profanity-check"])
RLOO_CHECK = "import trl, peft, datasets, torch, profanity_check; assert trl.__version__ == '1.16.0', trl.__version__"
BATCH, MINI_BATCH, NEW_TOKENS = 16, 4, 32
LORA_TARGETS = {"t5": ["q", "v"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
CAUSAL = ("gpt2", "llama")  # the archs the RLOO peer runs (RLOOTrainer takes causal LMs only)
PEERS = ("trl011", "rloo")
FLOOR_ARCHS = ("t5", "gpt2")  # floor.py puts LoRA on q,v / c_attn: it has no Llama targets
SIZES = ("tiny", "small", "base")
# "base": the 250M class for GPU runs, the shapes of t5-base and gpt2-medium (random weights), over the small
# models' tokenizers (vocab 2000): ~199M (T5) and ~305M (GPT-2) parameters. make_tiny_models.py knows tiny and
# small only; this script builds base from small with the peer's transformers, like the other sizes.
BASE_SHAPES = {
    "t5": {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12},
    "gpt2": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
}
BUILD_BASE = (
    "import json, sys, torch\n"
    "from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel, T5ForConditionalGeneration\n"
    "small, out, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
    "torch.manual_seed(0)\n"
    "for arch, cls in (('t5', T5ForConditionalGeneration), ('gpt2', GPT2LMHeadModel)):\n"
    "    cfg = AutoConfig.from_pretrained(f'{small}/{arch}')\n"
    "    for k, v in shapes[arch].items():\n"
    "        setattr(cfg, k, v)\n"
    "    model = cls(cfg)\n"
    "    print(arch, sum(p.numel() for p in model.parameters()), 'parameters', flush=True)\n"
    "    model.save_pretrained(f'{out}/{arch}')\n"
    "    AutoTokenizer.from_pretrained(f'{small}/{arch}').save_pretrained(f'{out}/{arch}')\n"
)
# the peer script's prompts, verbatim: both sides must encode the same queries
PROMPT = "Summarize the following conversation. #Person1#: item {i} arrived broken. #Person2#: sorry about that. Summary:"


class BenchError(RuntimeError):
    """The benchmark cannot run; the message names what is missing and the fix."""


# ------------------------------------------------------------------------------------------------ paths


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "detoxflow"
    return Path(os.environ.get("DETOXFLOW_CACHE", default)) / "bench"


def default_peer_bench() -> Path:
    return Path(os.environ.get("DETOXFLOW_PEER_BENCH", PROJECT_ROOT.parent / "shared" / "bench"))


def default_peer_venv() -> Path:
    return Path(os.environ.get("DETOXFLOW_PEER_VENV", cache_root() / "peer-trl011"))


def default_rloo_venv() -> Path:
    return Path(os.environ.get("DETOXFLOW_RLOO_VENV", cache_root() / "peer-trl116"))


def check_bench_dir(bench: Path, rloo: bool = False) -> None:
    wanted = (PEER_SCRIPT, FLOOR_SCRIPT, MODELS_SCRIPT, *((RLOO_SCRIPT,) if rloo else ()))
    missing = [s for s in wanted if not (bench / s).is_file()]
    if missing:
        raise BenchError(
            f"peer bench folder {bench}: missing {', '.join(missing)}. Pass --peer-bench DIR (or set "
            f"DETOXFLOW_PEER_BENCH) to the folder holding {', '.join(wanted)}"
        )


def ensure_peer_venv(venv: Path, pip: tuple[list[str], ...] = PEER_PIP, check: str = PEER_CHECK,
                     what: str = "trl 0.11.4") -> Path:
    """The peer venv's python, creating the venv with the peer's pip lines when ``venv`` does not exist."""
    python = venv / "bin" / "python"
    if python.exists():
        ok = subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=False)
        if ok.returncode == 0:
            return python
        if not (venv / ".detoxflow-peer").exists():
            raise BenchError(
                f"{venv} exists but is not a working peer venv ({ok.stderr.strip().splitlines()[-1:]}); "
                f"pass another --peer-venv (or DETOXFLOW_PEER_VENV), or remove that folder to let this script build it"
            )
        shutil.rmtree(venv)  # a half-built venv of our own from an interrupted run
    elif venv.exists():
        raise BenchError(f"{venv} exists but has no bin/python; pass another --peer-venv or remove that folder")
    print(f"building the peer venv in {venv} ({what}; a few minutes, once)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".detoxflow-peer").write_text("built by benchmarks/ppo_throughput.py\n")
    # the pip that venv bundles can be too old for the index (pip 23.2 failed on a version it could not parse)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-U", "pip"], check=True)
    for pkgs in pip:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pkgs], check=True)
    subprocess.run([str(python), "-c", check], check=True)
    return python


def size_archs(size: str) -> tuple[str, ...]:
    """The archs a size's model folder holds: make_tiny_models.py builds all three; base (below) t5 and gpt2."""
    return tuple(BASE_SHAPES) if size == "base" else tuple(LORA_TARGETS)


def ensure_models(models_root: Path, size: str, peer_python: Path, bench: Path) -> Path:
    """``models_root/<size>/{t5,gpt2,llama}`` built by the shared make_tiny_models.py (once; atomically; a folder
    from before it built ``llama`` is rebuilt whole, so that every arch of a size comes from one build).

    Built with the peer's transformers 4.46: this project's transformers 5 reads that layout, the reverse is
    not guaranteed."""
    dest = models_root / size
    if all((dest / a / "config.json").is_file() for a in size_archs(size)):
        return dest
    small = ensure_models(models_root, "small", peer_python, bench) if size == "base" else None
    models_root.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(dest) as tmp:
            if small is not None:
                cmd = [str(peer_python), "-c", BUILD_BASE, str(small), str(tmp), json.dumps(BASE_SHAPES)]
            else:
                cmd = [str(peer_python), str(bench / MODELS_SCRIPT), str(tmp), "--size", size]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise BenchError(f"{MODELS_SCRIPT} --size {size} failed:\n{e.stderr[-2000:]}") from None
    return dest


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Measured:
    stdout: str
    stderr: str
    returncode: int
    peak_rss_mb: float
    wall_s: float


def run_measured(cmd: list[str], env: dict[str, str], timeout: float) -> Measured:
    """Run ``cmd``; its peak RSS comes from the kernel's rusage of that one child (``os.wait4``), so a second
    measured command is not shadowed by the first one's peak as ``RUSAGE_CHILDREN`` would be."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=PROJECT_ROOT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from waiting on a reaped pid
        out.seek(0)
        err.seek(0)
        return Measured(out.read(), err.read(), proc.returncode, usage.ru_maxrss / 1024, wall)


# Every measured script runs under this shim. ``--clock cpu``: every timer both sides read (time.perf_counter)
# becomes the process's CPU time. On a machine shared with other work the wall clock mostly measures the queue
# for the CPU; the CPU time of a 1-thread process is what its wall time would be on a quiet machine (with 2
# threads it also counts OpenMP spin-waits). ``--threads``: the peer scripts hard-code torch.set_num_threads(2);
# the shim makes that call honour --threads so that both sides run with the same number of threads.
SHIM = (
    "import atexit, runpy, sys, time, torch\n"
    "clock, threads = sys.argv[1], int(sys.argv[2])\n"
    # peak GPU memory of the process's tensors (PyTorch's allocator; the same reading both sides)
    "atexit.register(lambda: torch.cuda.is_available() and torch.cuda.is_initialized() and "
    "print(f'GPU_PEAK_MB={torch.cuda.max_memory_allocated() / 2**20:.0f}', flush=True))\n"
    "if clock == 'cpu':\n    time.perf_counter = time.process_time\n"
    "_set = torch.set_num_threads\n"
    "torch.set_num_threads = lambda n: _set(threads)\n"
    "torch.set_num_threads(threads)\n"
    "sys.argv = sys.argv[3:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def with_shim(cmd: list[str], clock: str, threads: int) -> list[str]:
    """``[python, script, *args]`` -> the same under :data:`SHIM`."""
    return [cmd[0], "-c", SHIM, clock, str(threads), *cmd[1:]]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    return env


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class SideResult:
    side: str
    samples_per_s: float | None = None
    median_step_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None
    gpu_peak_mb: float | None = None
    wall_s: float | None = None
    load_before: float | None = None
    load_after: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_growth_mb: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def run_ours(model_dir: Path, arch: str, steps: int, threads: int, overrides: list[str], timeout: float,
             clock: str = "wall", profile: bool = False, device: str = "cpu") -> SideResult:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model-dir", str(model_dir), "--archs", arch,
           "--steps", str(steps), "--threads", str(threads), "--device", device]
    for o in overrides:
        cmd += ["--set", o]
    if profile:
        cmd.append("--profile")
    res = SideResult("ours", load_before=loadavg())
    m = run_measured(with_shim(cmd, clock, threads), child_env(threads), timeout)
    res.load_after, res.peak_rss_mb, res.wall_s = loadavg(), round(m.peak_rss_mb), round(m.wall_s, 1)
    res.gpu_peak_mb = gpu_peak(m.stdout)
    line = next((ln for ln in reversed(m.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if m.returncode != 0 or line is None:
        res.error = f"exit {m.returncode}: {(m.stderr or m.stdout)[-1500:]}"
        return res
    data = json.loads(line[len("RESULT "):])
    res.step_s, res.breakdown, res.phases = data["step_s"], data["breakdown"], data.get("phases", {})
    res.rss_growth_mb = data.get("peak_rss_mb", {})
    res.median_step_s = statistics.median(res.step_s)
    res.samples_per_s = round(BATCH / res.median_step_s, 2)
    return res


PEER_LINE = re.compile(r"median_step_s=([\d.]+) samples_per_s=([\d.]+)")


def run_peer(python: Path, bench: Path, model_dir: Path, arch: str, steps: int, threads: int, timeout: float,
             clock: str = "wall") -> SideResult:
    """TRL 0.11 ``PPOTrainer``: ``steps`` timed PPO steps."""
    cmd = [str(python), str(bench / PEER_SCRIPT), str(model_dir), "--arch", arch, "--steps", str(steps)]
    return _run_external("peer", cmd, PEER_LINE, threads, timeout, clock)


def _run_external(side: str, cmd: list[str], pattern: re.Pattern[str], threads: int, timeout: float,
                  clock: str) -> SideResult:
    """Run a peer's script measured, and read its median step (or cycle) time from the line ``pattern`` matches."""
    res = SideResult(side, load_before=loadavg())
    m = run_measured(with_shim(cmd, clock, threads), child_env(threads), timeout)
    res.load_after, res.peak_rss_mb, res.wall_s = loadavg(), round(m.peak_rss_mb), round(m.wall_s, 1)
    res.gpu_peak_mb = gpu_peak(m.stdout)
    found = pattern.search(m.stdout)
    if m.returncode != 0 or not found:
        res.error = f"exit {m.returncode}: {(m.stderr or m.stdout)[-1500:]}"
        return res
    res.median_step_s = float(found.group(1))
    res.samples_per_s = round(BATCH / res.median_step_s, 2)
    return res


RLOO_LINE = re.compile(r"median_cycle_s=([\d.]+) samples_per_s=([\d.]+)")


def run_rloo(python: Path, bench: Path, model_dir: Path, arch: str, steps: int, threads: int, timeout: float,
             clock: str = "wall") -> SideResult:
    """TRL 1.16 ``RLOOTrainer``: ``steps`` timed generation cycles of 16 samples after one warm-up cycle."""
    cmd = [str(python), str(bench / RLOO_SCRIPT), str(model_dir), "--arch", arch, "--cycles", str(steps)]
    return _run_external("rloo", cmd, RLOO_LINE, threads, timeout, clock)


GPU_PEAK = re.compile(r"^GPU_PEAK_MB=(\d+)$", re.MULTILINE)


def gpu_peak(stdout: str) -> float | None:
    """The peak GPU memory the shim printed at exit (MB), None on CPU."""
    found = GPU_PEAK.findall(stdout)
    return float(found[-1]) if found else None


FLOOR_PART = re.compile(r"(\w+)=([\d.]+)")


def run_floor(python: Path, bench: Path, model_dir: Path, arch: str, steps: int, threads: int, timeout: float,
              clock: str = "wall") -> SideResult:
    cmd = [str(python), str(bench / FLOOR_SCRIPT), str(model_dir), "--arch", arch, "--reps", str(max(steps, 1))]
    res = SideResult("floor", load_before=loadavg())
    m = run_measured(with_shim(cmd, clock, threads), child_env(threads), timeout)
    res.load_after, res.peak_rss_mb, res.wall_s = loadavg(), round(m.peak_rss_mb), round(m.wall_s, 1)
    res.gpu_peak_mb = gpu_peak(m.stdout)
    parts = dict(FLOOR_PART.findall(m.stdout.strip().splitlines()[-1] if m.stdout.strip() else ""))
    if m.returncode != 0 or "total_s" not in parts:
        res.error = f"exit {m.returncode}: {(m.stderr or m.stdout)[-1500:]}"
        return res
    res.median_step_s = float(parts.pop("total_s"))
    res.samples_per_s = round(BATCH / res.median_step_s, 2)
    parts.pop("samples_per_s", None)
    res.breakdown = {k: float(v) for k, v in parts.items()}
    return res


# ------------------------------------------------------------------------------------------------ our side


def vm_hwm_mb() -> float:
    """This process's peak RSS so far (Linux ``VmHWM``), 0.0 where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PhaseProfile:
    """Exclusive CPU and wall seconds per phase of our PPO step, by wrapping the calls the trainer makes.

    A wrapped call nested in another is charged to the inner phase only; whatever no wrapper covers (GAE,
    whitening, the loss math, metric reductions, the loop itself) is ``trainer python``. Phases are reset at
    every ``log`` call, so each PPO step yields one record."""

    def __init__(self) -> None:
        self.hwm_growth: dict[str, float] = {}  # MB by which each phase raised the process's peak RSS (all steps)
        self.hwm_start = vm_hwm_mb()
        self.acc: dict[str, list[float]] = {}
        self.stack: list[list[float]] = []  # [cpu_start, wall_start, cpu_in_children, wall_in_children]
        self.mark = (time.process_time(), time.perf_counter())

    def wrap(self, owner: Any, attr: str, name: Any) -> None:
        """Replace ``owner.attr`` by a timed wrapper; ``name`` is a phase name or a callable returning one."""
        orig = getattr(owner, attr)
        prof = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            hwm0 = vm_hwm_mb()
            prof.stack.append([time.process_time(), time.perf_counter(), 0.0, 0.0])
            try:
                return orig(*args, **kwargs)
            finally:
                c0, w0, cc, wc = prof.stack.pop()
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                label = name() if callable(name) else name
                grown = vm_hwm_mb() - hwm0
                if grown > 0 and not prof.stack:  # charged to the outermost wrapped call only
                    prof.hwm_growth[label] = prof.hwm_growth.get(label, 0.0) + grown
                slot = prof.acc.setdefault(label, [0.0, 0.0])
                slot[0] += cpu - cc
                slot[1] += wall - wc
                if prof.stack:
                    prof.stack[-1][2] += cpu
                    prof.stack[-1][3] += wall

        setattr(owner, attr, timed)

    def take(self) -> dict[str, dict[str, float]]:
        """Phases since the last take (one PPO step); the uncovered rest is ``trainer python``."""
        now = (time.process_time(), time.perf_counter())
        total_cpu, total_wall = now[0] - self.mark[0], now[1] - self.mark[1]
        out = {k: {"cpu": v[0], "wall": v[1]} for k, v in self.acc.items()}
        out["trainer python"] = {"cpu": total_cpu - sum(v[0] for v in self.acc.values()),
                                 "wall": total_wall - sum(v[1] for v in self.acc.values())}
        out["total"] = {"cpu": total_cpu, "wall": total_wall}
        self.acc, self.mark = {}, now
        return out


def install_phase_profile(scorer: Any) -> PhaseProfile:
    """Wrap the calls of one PPO step (see :class:`PhaseProfile`)."""
    import torch

    from detoxflow.models import monitors, trainer
    from detoxflow.models.policy import Policy

    prof = PhaseProfile()
    prof.wrap(Policy, "encode_queries", "tokenize")
    prof.wrap(Policy, "generate", "generate")
    prof.wrap(Policy, "rollout", "rollout (sampling + old logprobs, values, entropy)")
    prof.wrap(Policy, "decode", "decode")
    prof.wrap(scorer, "score", "score (profanity-check)")
    prof.wrap(Policy, "forward", lambda: "policy fwd, train" if torch.is_grad_enabled() else "policy fwd, no grad")
    prof.wrap(Policy, "ref_logprobs", "ref fwd (adapter off)")
    prof.wrap(torch.Tensor, "backward", "backward")
    prof.wrap(torch.nn.utils, "clip_grad_norm_", "clip grad norm")
    prof.wrap(torch.optim.AdamW, "step", "optimizer step")
    prof.wrap(trainer, "_check_finite", "finite checks")
    prof.wrap(monitors, "response_stats", "monitors")
    return prof


def worker(model_dir: Path, arch: str, steps: int, threads: int, overrides: list[str], profile: bool = False,
           device: str = "cpu") -> None:
    """Subprocess body: ``steps + 1`` PPO steps through ``trainer.train``; prints ``RESULT {json}``."""
    import logging

    import torch

    torch.set_num_threads(threads)
    from detoxflow.config import config_from_dict, parse_override, set_dotted
    from detoxflow.models.policy import Policy
    from detoxflow.models.reward import build_scorer
    from detoxflow.models.trainer import train

    logging.basicConfig(level=logging.WARNING)
    data: dict[str, Any] = {
        "name": "bench", "seed": 0,
        "model": {"name_or_path": str(model_dir), "device": device, "num_threads": threads},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": LORA_TARGETS[arch]},
        "reward": {"kind": "profanity_check"},
        "generation": {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": True,
                       "top_k": 0, "top_p": 1.0, "temperature": 1.0},
        "ppo": {"steps": steps + 1, "batch_size": BATCH, "mini_batch_size": MINI_BATCH, "ppo_epochs": 1,
                "learning_rate": 1.41e-5, "kl": {"mode": "adaptive", "init_coef": 0.2, "target": 6.0},
                # the peer neither checkpoints nor stops early; a final checkpoint after the last log is untimed
                "checkpoint_every": 10_000, "target_approx_kl": None},
    }
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg = config_from_dict(data, "benchmark")
    policy = Policy.load(cfg.model, cfg.lora)
    scorer = build_scorer(cfg.reward)
    prompts = [PROMPT.format(i=i) for i in range(BATCH)]
    stamps: list[float] = []
    history: list[dict[str, float]] = []
    phases: list[dict[str, dict[str, float]]] = []
    prof = install_phase_profile(scorer) if profile else None

    def log(metrics: dict[str, float], step: int) -> None:
        stamps.append(time.perf_counter())
        history.append(metrics)
        if prof is not None:
            phases.append(prof.take())

    with tempfile.TemporaryDirectory(prefix="detoxflow-bench-") as out:
        t0 = time.perf_counter()
        train(cfg, policy, scorer, prompts, out, log, resume=False)
    # step k's time is log(k) - log(k-1): the whole loop body; step 1 (no earlier stamp) is the warm-up
    step_s = [b - a for a, b in itertools.pairwise(stamps)]
    timed = history[1:]
    keys = [k for k in timed[0] if k.startswith("time/")]
    breakdown = {k.removeprefix("time/"): round(statistics.median(h[k] for h in timed), 4) for k in keys}
    breakdown["first_step_s"] = round(stamps[0] - t0, 3)
    result: dict[str, Any] = {"step_s": step_s, "breakdown": breakdown}
    if prof is not None:
        # where the peak RSS comes from: after loading, then what each phase added to it (first step included)
        result["peak_rss_mb"] = {"after load": round(prof.hwm_start, 1),
                                 **{k: round(v, 1) for k, v in sorted(prof.hwm_growth.items(), key=lambda kv: -kv[1])},
                                 "final": round(vm_hwm_mb(), 1)}
    if phases:
        timed_phases = phases[1:]
        names = sorted({k for p in timed_phases for k in p}, key=lambda k: -max(p.get(k, {"cpu": 0})["cpu"] for p in timed_phases))
        result["phases"] = {k: {c: round(statistics.median(p.get(k, {c: 0.0})[c] for p in timed_phases), 4)
                                for c in ("cpu", "wall")} for k in names}
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ report


def combine(results: list[SideResult]) -> dict[str, Any]:
    """Several repeats of one side -> the repeat with the median samples/s, the worst peak RSS, the load range,
    and every repeat under ``reps``."""
    ok = sorted((r for r in results if r.samples_per_s), key=lambda r: r.samples_per_s or 0.0)
    mid = asdict(ok[(len(ok) - 1) // 2] if ok else results[0])
    mid["peak_rss_mb"] = max((r.peak_rss_mb for r in results if r.peak_rss_mb is not None), default=None)
    mid["gpu_peak_mb"] = max((r.gpu_peak_mb for r in results if r.gpu_peak_mb is not None), default=None)
    loads = [x for r in results for x in (r.load_before, r.load_after) if x is not None]
    mid["load_before"], mid["load_after"] = (min(loads), max(loads)) if loads else (None, None)
    mid["error"] = next((r.error for r in results if r.error), None)
    if len(results) > 1:
        mid["reps"] = [asdict(r) for r in results]
    return mid


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The headline table: samples/s of each side, our ratio to each peer (the median of the per-repeat ratios),
    peak RSS of each side, the load while measuring. ``peer`` is TRL 0.11 PPO, ``rloo`` TRL 1.16 RLOO."""
    lines = [("| arch | size | ours samples/s | TRL 0.11 PPO samples/s | ratio ours/PPO | TRL 1.16 RLOO samples/s "
              "| ratio ours/RLOO | floor samples/s | ours peak RSS MB | PPO peak RSS MB | RLOO peak RSS MB | load (1 min) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p, q, f = r.get("ours"), r.get("peer"), r.get("rloo"), r.get("floor")
        loads = [s[k] for s in (o, p, q, f) if s for k in ("load_before", "load_after") if s.get(k) is not None]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        lines.append(
            f"| {r['arch']} | {r['size']} | {fmt(o and o['samples_per_s'])} | {fmt(p and p['samples_per_s'])} "
            f"| {fmt(r.get('ratio'))} | {fmt(q and q['samples_per_s'])} | {fmt(r.get('ratio_rloo'))} "
            f"| {fmt(f and f['samples_per_s'])} | {fmt(o and o['peak_rss_mb'], '.0f')} "
            f"| {fmt(p and p['peak_rss_mb'], '.0f')} | {fmt(q and q['peak_rss_mb'], '.0f')} | {load} |"
        )
    return "\n".join(lines)


def gpu_table(rows: list[dict[str, Any]], gpu: str) -> str:
    """The GPU table: samples/s each side, the ratio, peak GPU memory (PyTorch allocator) each side."""
    lines = [f"GPU: {gpu}", "",
             "| arch | size | ours samples/s | peer samples/s | ratio ours/peer | ours peak GPU MB | peer peak GPU MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p = r.get("ours"), r.get("peer")
        lines.append(
            f"| {r['arch']} | {r['size']} | {fmt(o and o['samples_per_s'])} | {fmt(p and p['samples_per_s'])} "
            f"| {fmt(r.get('ratio'))} | {fmt(o and o['gpu_peak_mb'], '.0f')} | {fmt(p and p['gpu_peak_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def gpu_name() -> str | None:
    """The first visible GPU's name (nvidia-smi), None without one; read without importing torch here."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Our median per-phase seconds (from the trainer's own time/* metrics) next to the floor's."""
    lines = [("| arch | size | ours: generate+decode s | ours: score+old fwd+ref fwd s | ours: update s | ours: step s "
              "| floor: generate s | floor: fwd policy s | floor: fwd ref s | floor: train s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, f = (r.get("ours") or {}).get("breakdown", {}), (r.get("floor") or {}).get("breakdown", {})
        lines.append(
            f"| {r['arch']} | {r['size']} | {fmt(o.get('generate_s'), '.3f')} | {fmt(o.get('forward_s'), '.3f')} "
            f"| {fmt(o.get('update_s'), '.3f')} | {fmt(o.get('step_s'), '.3f')} | {fmt(f.get('generate'), '.3f')} "
            f"| {fmt(f.get('fwd_policy'), '.3f')} | {fmt(f.get('fwd_ref'), '.3f')} | {fmt(f.get('train'), '.3f')} |"
        )
    return "\n".join(lines)


def phase_table(rows: list[dict[str, Any]]) -> str:
    """Per-phase median seconds of our step (CPU / wall) and the CPU share, one column per (arch, size)."""
    cols = [r for r in rows if (r.get("ours") or {}).get("phases")]
    names: list[str] = []
    for r in cols:
        names += [k for k in r["ours"]["phases"] if k not in names and k != "total"]
    names.append("total")
    head = "| phase | " + " | ".join(f"{r['arch']} {r['size']}: cpu s (share) / wall s" for r in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for n in names:
        cells = []
        for r in cols:
            ph = r["ours"]["phases"]
            v, tot = ph.get(n, {"cpu": 0.0, "wall": 0.0}), ph["total"]["cpu"] or 1.0
            cells.append(f"{v['cpu']:.3f} ({100 * v['cpu'] / tot:.0f}%) / {v['wall']:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS (MB): after loading, then how much each phase raised it (all steps), then the final peak:", ""]
    for r in cols:
        growth = r["ours"].get("rss_growth_mb") or {}
        lines.append(f"- {r['arch']} {r['size']}: " + ", ".join(f"{k} {v:.0f}" for k, v in growth.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help="comma list of tiny,small,base (base: t5-base / gpt2-medium "
                    "shapes, ~200M / ~300M parameters, for GPUs)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="our side's model.device; the peer (accelerate) takes the GPU whenever one is visible, so "
                         "run --device cpu on a CPU-only machine or under CUDA_VISIBLE_DEVICES=''")
    ap.add_argument("--archs", default="t5,gpt2", help="comma list of t5,gpt2,llama")
    ap.add_argument("--peers", default="trl011,rloo",
                    help="comma list of trl011 (TRL 0.11 PPOTrainer, every arch) and rloo (TRL 1.16 RLOOTrainer, "
                         "causal archs only: gpt2, llama)")
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps per run (one more runs first, as warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of every measured process")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall (the real figure, quiet machine) or cpu: process CPU time, a load-robust proxy on a "
                         "shared machine (use it with --threads 1)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each side this many times, alternating which goes first; figures are medians and the "
                         "ratio is the median of the per-repeat ratios (use 3+ on a busy machine)")
    ap.add_argument("--only", choices=["both", "ours", "peer"], default="both")
    ap.add_argument("--floor", action="store_true",
                    help="also time the shared floor.py on the same model dirs (t5, gpt2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a config override for our side, e.g. --set ppo.ppo_epochs=2 (repeatable)")
    ap.add_argument("--peer-venv", type=Path, default=None, help="the peer venv (env DETOXFLOW_PEER_VENV); built if missing")
    ap.add_argument("--rloo-venv", type=Path, default=None,
                    help="the RLOO peer's venv (env DETOXFLOW_RLOO_VENV); built if missing")
    ap.add_argument("--peer-bench", type=Path, default=None, help="folder of the peer scripts (env DETOXFLOW_PEER_BENCH)")
    ap.add_argument("--models-dir", type=Path, default=None, help="where the benchmark models are built and cached")
    ap.add_argument("--json", type=Path, default=None, help="results file (default .detoxflow/bench/ppo_throughput-<time>.json)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measured process")
    ap.add_argument("--profile", action="store_true",
                    help="our side only, with a per-phase CPU/wall profile of the PPO step (generate, forwards, "
                         "scoring, backward, optimizer, trainer python)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    if a.worker:
        worker(a.model_dir, a.archs, a.steps, a.threads, a.overrides, a.profile, a.device)
        return 0

    sizes = [s for s in a.sizes.split(",") if s]
    archs = [x for x in a.archs.split(",") if x]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown size '{s}'; allowed: {', '.join(SIZES)}")
    peers = [x for x in a.peers.split(",") if x]
    for x in archs:
        if x not in LORA_TARGETS:
            ap.error(f"--archs: unknown arch '{x}'; allowed: {', '.join(LORA_TARGETS)}")
    for x in peers:
        if x not in PEERS:
            ap.error(f"--peers: unknown peer '{x}'; allowed: {', '.join(PEERS)}")
    for s in sizes:
        if [x for x in archs if x not in size_archs(s)]:
            ap.error(f"--sizes {s} holds {', '.join(size_archs(s))} only; drop the other archs from --archs")
    use_rloo = "rloo" in peers and a.only in ("both", "peer") and not a.profile and any(x in CAUSAL for x in archs)
    bench = (a.peer_bench or default_peer_bench()).resolve()
    try:
        check_bench_dir(bench, rloo=use_rloo)
        peer_python = ensure_peer_venv((a.peer_venv or default_peer_venv()).resolve())
        rloo_python = ensure_peer_venv((a.rloo_venv or default_rloo_venv()).resolve(), RLOO_PIP, RLOO_CHECK,
                                       "trl 1.16.0") if use_rloo else None
        models_root = (a.models_dir or cache_root() / "models").resolve()
        dirs = {s: ensure_models(models_root, s, peer_python, bench) for s in sizes}
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    started = dt.datetime.now().astimezone()
    meta = {"date": started.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "threads": a.threads, "clock": a.clock, "peers": peers, "device": a.device, "gpu": gpu_name(), "steps": a.steps, "repeats": a.repeats,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "overrides": a.overrides, "load_at_start": list(os.getloadavg()),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "settings": {"batch": BATCH, "mini_batch": MINI_BATCH, "ppo_epochs": 1, "new_tokens": NEW_TOKENS,
                         "lora": "r=8 alpha=16 dropout=0.05", "kl": "adaptive from 0.2", "reward": "alt-profanity-check"}}
    print(f"{meta['date']}  load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus  threads={a.threads}  clock={a.clock}  "
          f"device={a.device}{' (' + meta['gpu'] + ')' if meta['gpu'] else ''}  steps={a.steps}+1 warm-up", flush=True)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for arch in archs:
            model_dir = dirs[size] / arch
            row: dict[str, Any] = {"arch": arch, "size": size, "model_dir": str(model_dir)}
            runs: list[tuple[str, Any, tuple[Any, ...]]] = []
            if a.only in ("both", "ours") or a.profile:
                runs.append(("ours", run_ours, (model_dir, arch, a.steps, a.threads, a.overrides, a.timeout, a.clock,
                                                a.profile, a.device)))
            if a.only in ("both", "peer") and not a.profile and "trl011" in peers:
                runs.append(("peer", run_peer, (peer_python, bench, model_dir, arch, a.steps, a.threads, a.timeout,
                                                a.clock)))
            if rloo_python is not None and arch in CAUSAL:
                runs.append(("rloo", run_rloo, (rloo_python, bench, model_dir, arch, a.steps, a.threads, a.timeout,
                                                a.clock)))
            if a.floor and arch in FLOOR_ARCHS:
                runs.append(("floor", run_floor, (peer_python, bench, model_dir, arch, a.steps, a.threads, a.timeout,
                                                  a.clock)))
            done: dict[str, list[SideResult]] = {side: [] for side, _, _ in runs}
            for rep in range(a.repeats):
                # alternate the order, so that neither side always runs first (load drifts within a run)
                for side, fn, fn_args in runs if rep % 2 == 0 else runs[::-1]:
                    res = fn(*fn_args)
                    done[side].append(res)
                    status = res.error.splitlines()[-1] if res.error else (
                        f"{res.samples_per_s:.2f} samples/s, peak RSS {res.peak_rss_mb:.0f} MB"
                        + (f", peak GPU {res.gpu_peak_mb:.0f} MB" if res.gpu_peak_mb is not None else ""))
                    print(f"  {arch:4s} {size:5s} {side:5s}: {status}  (load {res.load_before}->{res.load_after})",
                          flush=True)
                    if res.error:
                        print(res.error, file=sys.stderr)
            for side, results in done.items():
                row[side] = combine(results)
            for peer, key in (("peer", "ratio"), ("rloo", "ratio_rloo")):
                if done.get("ours") and done.get(peer):
                    ratios = [o.samples_per_s / p.samples_per_s for o, p in zip(done["ours"], done[peer], strict=True)
                              if o.samples_per_s and p.samples_per_s]
                    row[f"{key}_reps"] = [round(x, 3) for x in ratios]
                    row[key] = round(statistics.median(ratios), 3) if ratios else None
            rows.append(row)

    print()
    print(table(rows))
    if a.device == "cuda":
        print()
        print(gpu_table(rows, meta["gpu"] or "?"))
    if any("ours" in r for r in rows):
        print()
        print(breakdown_table(rows))
    if a.profile:
        print()
        print(phase_table(rows))
    out = a.json or PROJECT_ROOT / ".detoxflow" / "bench" / f"ppo_throughput-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["load_at_end"] = list(os.getloadavg())
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nresults: {out}")
    failed = any(r.get(s, {}).get("error") for r in rows for s in ("ours", "peer", "rloo", "floor"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

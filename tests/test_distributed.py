"""Data-parallel training: `orchestration.train_processes: 2` runs the trainer in two processes started by
`accelerate launch` on CPU (gloo).

- the pure parts: each rank's shard of a step's batch, the no-op single-process context, the checkpoint
  fingerprint (unchanged for one process), the launch command, the CLI refusing a bare launcher;
- the real thing (slow): the pipeline with a 2-process training of a tiny T5: both ranks train, their weights
  are equal after training and differ from the start (gradients averaged), and only rank 0 logs to MLflow
  (one train run, one metric point per step) and one model version is registered.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detoxflow.config import load_config
from detoxflow.models import distributed
from detoxflow.models.checkpoint import run_fingerprint
from detoxflow.models.trainer import batch_indices

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shards_partition_each_global_batch(world: int) -> None:
    n, per_rank = 13, 3
    for step in range(1, 8):
        global_batch = batch_indices(n, per_rank * world, step, seed=5)
        shards = [distributed.shard(global_batch, r, world) for r in range(world)]
        assert all(len(s) == per_rank for s in shards)
        assert [i for s in shards for i in s] == global_batch  # together: the whole batch, in order
    # rank 0 of one process sees exactly what the single-process trainer saw
    assert distributed.shard(batch_indices(n, 3, 2, 5), 0, 1) == batch_indices(n, 3, 2, 5)
    with pytest.raises(ValueError, match="does not split evenly"):
        distributed.shard(list(range(5)), 0, 2)


def test_single_process_context_is_a_no_op() -> None:
    d = distributed.current()
    assert d == distributed.SINGLE and d.is_main and not d.enabled
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    d.average_gradients_([p])
    d.broadcast_([p])
    d.barrier()
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.data, torch.ones(3))
    assert d.mean(1.5) == 1.5 and d.mean_metrics({"a": 1.0}) == {"a": 1.0} and d.gather_object(7) == [7]
    a, b = torch.zeros(4), torch.zeros(4)
    assert distributed.params_digest([a]) == distributed.params_digest([b])
    b[2] = 1e-7
    assert distributed.params_digest([a]) != distributed.params_digest([b])


def test_fingerprint_is_unchanged_for_one_process_and_names_the_world_size() -> None:
    cfg = load_config(None, [])
    prompts = ["a", "b"]
    assert run_fingerprint(cfg, prompts) == run_fingerprint(cfg, prompts, world_size=1)
    assert run_fingerprint(cfg, prompts, world_size=2) != run_fingerprint(cfg, prompts)


def test_launch_command_runs_accelerate_on_the_cpu_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detoxflow.tasks.training import ACCELERATE_CONFIG_ENV, launch_command

    monkeypatch.delenv(ACCELERATE_CONFIG_ENV, raising=False)
    cfg = load_config(None, ["model.device=cpu", "orchestration.train_processes=3"])
    cmd = launch_command(cfg, tmp_path / "c.json", "run1", "key1", tmp_path / "r.json", "abcd")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(ROOT / "infra/accelerate/ddp-cpu.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    # a real, free port: torch 2.6's elastic agent passes a port of 0 to the ranks unchanged, and they hang
    port = int(cmd[cmd.index("--main_process_port") + 1])
    assert port > 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
    assert cmd[cmd.index("-m", 3) + 1 : cmd.index("-m", 3) + 3] == ["detoxflow.cli", "train-rank"]
    assert cmd[-2:] == ["--expected-train-digest", "abcd"]
    monkeypatch.setenv(ACCELERATE_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="missing.yaml not found"):
        launch_command(cfg, tmp_path / "c.json", "run1", "key1", tmp_path / "r.json", None)


def test_cli_train_refuses_to_run_under_a_bare_launcher() -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run([sys.executable, "-m", "detoxflow.cli", "train", "--num-processes", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--num-processes N" in res.stderr and "without accelerate launch" in res.stderr


# ------------------------------------------------------------------------------------------ two processes


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_two_process_gloo_training_averages_gradients_and_only_rank0_logs(tmp_path: Path, tiny_models) -> None:
    import mlflow
    from test_flows import CORPUS, tiny_config, write_split

    from detoxflow import tracking
    from detoxflow.flows.pipeline import pipeline

    if not (CORPUS / "train.jsonl").is_file():
        pytest.skip("the shipped corpus data/*.jsonl is missing")
    write_split(CORPUS / "train.jsonl", tmp_path / "data" / "train.jsonl", 12)
    write_split(CORPUS / "test.jsonl", tmp_path / "data" / "test.jsonl", 4)
    steps = 2
    cfg = tiny_config(tmp_path, tiny_models["t5"], "ddp",
                      "orchestration.train_processes=2", f"ppo.steps={steps}", "ppo.batch_size=2",
                      "ppo.mini_batch_size=2", "ppo.learning_rate=1e-2")

    state = pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    tracking.setup(cfg)
    client = mlflow.MlflowClient()  # the current tracking URI, as tracking.setup set it
    train_run = client.get_run(summary["mlflow"]["train_run_id"])
    result = json.loads(Path(client.download_artifacts(train_run.info.run_id, "train/result.json",
                                                       str(tmp_path / "dl"))).read_text())
    ddp = result["distributed"]
    assert ddp["world_size"] == 2
    start, end = ddp["params_digest_start"], ddp["params_digest_end"]
    assert len(end) == 2 and end[0] == end[1], "both ranks must hold the same weights after training"
    assert start[0] == start[1] and end[0] != start[0], "training must have changed the (shared) weights"

    # both ranks joined the gloo group and trained (each logs its own line)
    ranks_log = (Path(result["artifact_dir"]).parent / "launch" / "ranks.log").read_text()
    for rank in (0, 1):
        assert f"rank {rank} of 2 joined the process group (backend gloo" in ranks_log

    # only rank 0 logged: one train run, one point per step (rank 1 logging would double them)
    exp = train_run.info.experiment_id
    trains = client.search_runs([exp], filter_string=f"tags.`{tracking.TAG_STAGE}` = 'train'")
    assert [r.info.run_id for r in trains] == [train_run.info.run_id]
    assert train_run.data.tags["detoxflow.train_processes"] == "2"
    kl = client.get_metric_history(train_run.info.run_id, "objective/kl")
    assert sorted(m.step for m in kl) == list(range(1, steps + 1))
    # ... and one version was registered, from that run
    versions = client.search_model_versions(f"name = '{cfg.registered_model_name}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", train_run.info.run_id)]


# ------------------------------------------------------------------------------------------ gradient averaging
# Two gloo processes, each with half of a batch, against one process with the whole batch: after one PPO update
# (one mini-batch, one epoch, plain SGD, no clipping) the weights agree to 1e-6. The comparison is with ONE
# process over the CONCATENATED batch: ppo_update takes each rank's loss as the mean over its own tokens and the
# all-reduce averages the ranks' gradients, which equals the gradient of the mean over all tokens when every
# rank holds the same number of tokens; so the responses here all have the full length (no EOS), and the
# advantages and returns are given (whitening happens before ppo_update, per rank, as in DDP). Fails on the
# mutant "missing gradient averaging" (the summed gradients not divided by the world size: the two-process step
# is twice as long) and on one without the all-reduce (each rank steps on its own half).

DDP_ROWS, DDP_LEN, DDP_LR = 8, 6, 0.1


def _ddp_setup(model_dir: str, rows: slice):
    """The policy (moved LoRA, same on every process) and ``rows`` of a fixed batch: query, full-length
    responses without EOS, old logprobs and values, given advantages and returns."""
    from detoxflow.config import load_config as _load
    from detoxflow.models.policy import Policy

    cfg = _load(None, [f"model.name_or_path={model_dir}", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
                       f"ppo.batch_size={rows.stop - rows.start}", f"ppo.mini_batch_size={rows.stop - rows.start}",
                       "ppo.ppo_epochs=1", "ppo.max_grad_norm=1e6", "ppo.target_approx_kl=null", "ppo.ent_coef=0"])
    torch.manual_seed(0)
    policy = Policy.load(cfg.model, cfg.lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    prompts = [f"person {i} says the order arrived late and the manager agrees" for i in range(DDP_ROWS)]
    q, qm = policy.encode_queries(prompts, 64)
    eos = policy.eos_token_id
    r = torch.randint(3, len(policy.tokenizer), (DDP_ROWS, DDP_LEN), generator=g)
    r[r == eos] = eos + 1
    rm = torch.ones_like(r, dtype=torch.bool)
    adv = torch.randn(DDP_ROWS, DDP_LEN, generator=g)
    ret = torch.randn(DDP_ROWS, DDP_LEN, generator=g)
    with torch.no_grad():
        old_lp, old_v, _ = policy.forward(q, qm, r, rm, with_entropy=False)
    # a pre-update policy that is not the rollout's, so the ratio and the value clipping take part
    old_lp = old_lp + 0.1 * torch.randn(old_lp.shape, generator=g)
    batch = [x[rows] for x in (q, qm, r, rm, old_lp, old_v, adv, ret)]
    return cfg, policy, batch


def _ddp_update(model_dir: str, rows: slice, dist: distributed.Dist) -> tuple[list[torch.Tensor], dict]:
    from detoxflow.models.trainer import ppo_update

    cfg, policy, (q, qm, r, rm, old_lp, old_v, adv, ret) = _ddp_setup(model_dir, rows)
    params = policy.trainable_parameters()
    opt = torch.optim.SGD(params, lr=DDP_LR)
    stats = ppo_update(cfg, policy, opt, 1, q, qm, r, rm, old_lp, old_v, adv, ret, "test", "none", dist=dist)
    return [p.detach().clone() for p in params], stats


def _ddp_rank_main(rank: int, init_file: str, model_dir: str, out: str) -> None:
    """One of two processes: join a gloo group, update on its half, save its weights and stats."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = DDP_ROWS // 2
        weights, stats = _ddp_update(model_dir, slice(rank * half, (rank + 1) * half), distributed.current())
        torch.save({"weights": weights, "stats": stats}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_step_like_one_process_on_the_whole_batch(tiny_models, tmp_path: Path) -> None:
    model_dir = str(tiny_models["t5"])
    code = ("import sys, torch; sys.path.insert(0, {tests!r}); from test_distributed import _ddp_rank_main; "
            "_ddp_rank_main(int(sys.argv[1]), {init!r}, {model!r}, sys.argv[2])").format(
        tests=str(ROOT / "tests"), init=str(tmp_path / "pg-init"), model=model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(tmp_path / f"rank{rank}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    torch.set_num_threads(1)
    whole, whole_stats = _ddp_update(model_dir, slice(0, DDP_ROWS), distributed.SINGLE)
    start = [p.detach() for p in _ddp_setup(model_dir, slice(0, DDP_ROWS))[1].trainable_parameters()]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    moved = max(float((w - s).abs().max()) for w, s in zip(whole, start))
    assert moved > 1e-3  # the step is large enough for a wrong scale to show
    for res in ranks:
        for w, got in zip(whole, res["weights"], strict=True):
            torch.testing.assert_close(got, w, rtol=0.0, atol=1e-6)
    # the ranks' statistics, averaged as ppo_step logs them, are those of the whole batch (equal token counts)
    for key in ("loss/policy", "loss/value", "policy/ratio", "policy/approxkl", "policy/clipfrac"):
        mean = (ranks[0]["stats"][key] + ranks[1]["stats"][key]) / 2
        assert mean == pytest.approx(whole_stats[key], abs=1e-6), key

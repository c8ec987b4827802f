"""Data-parallel training across processes started by ``accelerate launch`` (torchrun underneath).

What PyTorch DDP does for a wrapped module, done explicitly for the few tensors PPO trains (LoRA weights and the
value head), because the policy is used through several entry points (``generate``, ``forward``,
``ref_logprobs`` with the adapter disabled) that a ``DistributedDataParallel`` wrapper would hide:

- rank 0's trainable weights are broadcast once at the start, so every rank starts from the same policy;
- after each mini-batch's backward passes the gradients are averaged over the ranks (one all-reduce of one
  flat buffer), so every rank takes the same optimizer step and the weights stay equal;
- scalars that steer the loop (approx-KL for early stopping, the batch KL for the KL controller) and the
  logged metrics are averaged too, so every rank makes the same decisions.

Outside a launch :func:`current` returns :data:`SINGLE`, whose operations are no-ops: single-process training
runs exactly the code it ran before. Imports only torch (plus accelerate, lazily, to start the process group).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


def launched() -> bool:
    """True inside a multi-process launch (torchrun / accelerate launch set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` in ``[0, world_size)``; rank 0 writes and logs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (the start of DDP: one set of weights)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=src)

    def average_gradients_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each ``.grad`` by its mean over the ranks, through one flat buffer (one all-reduce).

        A parameter without a gradient on this rank counts as a zero gradient, so every rank contributes
        buffers of the same size; gradient clipping afterwards sees the same averaged gradient everywhere."""
        if not self.enabled:
            return
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def mean(self, value: float) -> float:
        """The mean of a Python scalar over the ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return float(t.item() / self.world_size)

    def mean_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Every metric averaged over the ranks (each rank's batch shard is the same size, so the mean of the
        rank means is the mean over the whole batch). All ranks must pass the same keys."""
        if not self.enabled:
            return dict(metrics)
        keys = sorted(metrics)
        gathered = self.gather_object(keys)
        if any(k != keys for k in gathered):
            raise RuntimeError(f"rank {self.rank}: metric keys differ across ranks: {gathered}")
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def current() -> Dist:
    """The process group this process belongs to (started by :func:`init`), else :data:`SINGLE`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    return SINGLE


def init(cpu: bool) -> Dist:
    """Join the process group of the launch this process is part of: gloo on CPU, NCCL on GPUs (one per
    ``LOCAL_RANK``; accelerate also selects that device). Outside a launch: :data:`SINGLE`, nothing started."""
    if not launched():
        return SINGLE
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        log.info("rank %d of %d joined the process group (backend %s, device %s)", state.process_index,
                 state.num_processes, torch.distributed.get_backend(), state.device)
    return current()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch whose length is a multiple of ``world_size``."""
    if len(indices) % world_size:
        raise ValueError(f"a batch of {len(indices)} does not split evenly over {world_size} processes")
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]


def params_digest(params: Iterable[torch.Tensor]) -> str:
    """sha256 (16 hex chars) of the exact bytes of ``params``: equal on two ranks iff their weights are equal."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

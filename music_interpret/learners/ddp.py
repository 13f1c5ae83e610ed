"""Data-parallel helpers (DistributedDataParallel) of the dictionary trainer.

Launch one process per device with ``torchrun``; each process runs the same training
code (same store, seed and config), so every rank draws the SAME global batch from
its loader and keeps its own contiguous share of it (``batch_size / world`` rows,
so ``batch_size`` must be a multiple of the world size). Gradients are averaged by
``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU), the firing tracker of dead
latents is fed the all-reduced firing counts, logged metrics are averaged over the
ranks, and only rank 0 writes TensorBoard events, checkpoints and the evaluation.
Losses that are means over tokens (``relu_l1``) match single-process training on the
same global batches up to float rounding; ``topk`` normalises by each rank's batch
variance, a close approximation. Example (2 GPUs)::

    torchrun --standalone --nproc_per_node 2 -m music_interpret.learners.distributed \\
        STORE HOOK OUT_DIR --learner relu_l1 --steps 10000 --batch-size 8192 --d-sae 16384

(:mod:`music_interpret.learners.distributed`; the ``train`` stage of a pipeline run
under ``torchrun`` trains this way too, see :mod:`music_interpret.ranks`). In code: call :func:`init` (reads torchrun's environment), then build and
run a :class:`~music_interpret.learners.trainer.Trainer` as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ranks import DistInfo, init  # noqa: F401 - init re-exported


def info() -> DistInfo:
    """Rank and world size of the initialised default process group (or 0 / 1)."""
    import torch.distributed  # noqa: F401 - loaded, so that ranks.info can see the group

    from ..ranks import info as ranks_info

    return ranks_info()


def shard(x: torch.Tensor, d: DistInfo) -> torch.Tensor:
    """This rank's contiguous share of a global batch."""
    if not d.enabled:
        return x
    n = x.shape[0]
    if n % d.world:
        raise ValueError(f"batch of {n} tokens does not split evenly over {d.world} ranks")
    per = n // d.world
    return x[d.rank * per : (d.rank + 1) * per]


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``mean`` or ``max``) over the default group."""
    import torch.distributed as dist

    d = info()
    if not d.enabled:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= d.world
    return t


class LossModule(nn.Module):
    """``learner.loss(model, ...)`` as a module forward, so DDP can wrap it."""

    def __init__(self, model: nn.Module, learner: Any) -> None:
        super().__init__()
        self.model = model
        self.learner = learner

    def forward(self, x: torch.Tensor, step: int, total: int,
                dead: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.learner.loss(self.model, x, step, total, dead)


def wrap(model: nn.Module, learner: Any, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the learner's loss (rank 0's weights broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(LossModule(model, learner), device_ids=ids)

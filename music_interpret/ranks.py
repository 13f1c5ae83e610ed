"""A pipeline run under ``torchrun``: rank 0 leads, the other ranks join data-parallel stages.

``torchrun --standalone --nproc_per_node N -m music_interpret run pipeline.yaml`` starts N
copies of the same command. Rank 0 runs the engine as one process would (locks, the run
manifest, skip decisions, every stage, publishing). Before a stage that declares
``distributed = True`` (``extract``, ``train``) it sends the other ranks what they need to
run it too (:func:`send`); they run it with ``ctx.dist`` set and everybody meets at a
barrier before rank 0 publishes the output. Stages that are not distributed run on rank 0
alone while the others wait for the next message. The messages, barriers and gathers of
this module go over a gloo group with a long timeout, so waiting ranks hold no GPU and a
long single-rank stage does not time them out; gradients go over the default group (NCCL
on GPUs, gloo on CPU). Every rank must see the same file system.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

CONTROL_TIMEOUT = timedelta(hours=24)
_control: Any = None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group (world 1: not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (NCCL with one GPU per local
    rank when ``device`` resolves to CUDA, gloo otherwise); the world of one process
    otherwise."""
    global _control
    if not launched():
        return DistInfo()
    import torch.distributed as dist

    from .resources import resolve_device

    device = resolve_device(device)
    d, _ = init("cpu" if not device.startswith("cuda") else device)
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return d


def init(device: str | None = None) -> tuple[DistInfo, str]:
    """Initialise the default process group from torchrun's environment; (info, device).

    NCCL with one GPU per local rank when CUDA is available (unless ``device`` is
    ``cpu``), gloo on CPU. Without ``WORLD_SIZE`` > 1 nothing is initialised.
    """
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return info(), f"cuda:{local}"
    return info(), "cpu"


def info() -> DistInfo:
    """This process's rank and the world size (0 / 1 outside a process group)."""
    dist = sys.modules.get("torch.distributed")  # a process group needs torch loaded already
    if dist is not None and dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def send(message: dict[str, Any]) -> None:
    """Rank 0: send ``message`` to every other rank."""
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0, group=_control)


def receive() -> dict[str, Any]:
    """Ranks other than 0: the next message of rank 0."""
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return dict(box[0])


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a world of one)."""
    if info().enabled:
        import torch.distributed as dist

        dist.barrier(group=_control)


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in a world of one)."""
    if not info().enabled:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * info().world
    dist.all_gather_object(out, value, group=_control)
    return out


def stop(ok: bool) -> None:
    """Leave the process group; after a success, first wait for the other ranks."""
    global _control
    if not info().enabled:
        return
    import torch.distributed as dist

    if ok:
        barrier()
    dist.destroy_process_group()
    _control = None

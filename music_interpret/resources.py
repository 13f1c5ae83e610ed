"""Memory a request would need against what the machine has, checked before allocating."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory(device: str = "cpu") -> int | None:
    """Bytes free for new allocations on ``device`` (None when it cannot be told)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def human_bytes(n: float) -> str:
    """``1.5 GiB`` style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def memory_problem(need: float, what: str, device: str = "cpu") -> str | None:
    """One line when ``need`` bytes exceed what ``device`` has free, else None."""
    have = available_memory(device)
    if have is None or need <= have:
        return None
    return (f"{what} needs about {human_bytes(need)} of memory, but {device} has "
            f"{human_bytes(have)} available")


def check_memory(need: float, what: str, device: str = "cpu") -> None:
    """Raise :class:`UserError` when ``need`` bytes exceed what ``device`` has free."""
    problem = memory_problem(need, what, device)
    if problem:
        raise UserError(problem)

"""MMT's training recipe and where it runs: the learning-rate schedule, the augmentation,
batches and the order of the songs in an epoch, the per-field validation loss, the device
and the precision (used by :mod:`.training`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import UserError
from .baselines import FIELDS
from .windows import pad_codes

if TYPE_CHECKING:
    import torch

    from .model import MMTModel


# --------------------------------------------------------------------------- recipe


def lr_factor(step: int, warmup: int, decay_end: int, multiplier: float) -> float:
    """MMT's ``get_lr_multiplier``: linear warm-up to 1 over ``warmup`` steps, then linear
    decay to ``multiplier`` at step ``decay_end``, constant after."""
    if step < warmup:
        return (step + 1) / warmup
    if step > decay_end:
        return multiplier
    position = (step - warmup) / max(1, decay_end - warmup)
    return max(multiplier, 1 - (1 - multiplier) * position)


def augment(notes: np.ndarray, rng: np.random.Generator, max_beat: int) -> np.ndarray:
    """MMT's augmentation: shift pitches by -5..+6 and pick a random start beat if too long."""
    notes = notes.copy()
    notes[:, 2] = np.clip(notes[:, 2] + rng.integers(-5, 7), 0, 127)
    n_beats = int(notes[-1, 0]) + 1
    if n_beats > max_beat:
        for _ in range(10):
            start = int(rng.integers(n_beats - max_beat))
            sliced = notes[(notes[:, 0] >= start) & (notes[:, 0] < start + max_beat)]
            if len(sliced) > 10:
                break
        sliced[:, 0] -= start
        notes = sliced
    return notes


def collate(seqs: Sequence[np.ndarray]) -> tuple[Any, Any]:
    """Zero-pad code arrays (T_i, 6) into a batch; returns (codes, mask) tensors."""
    import torch

    codes, mask = pad_codes(list(seqs))
    return torch.from_numpy(codes), torch.from_numpy(mask)


def epoch_order(seed: int, epoch: int, n: int, lengths: np.ndarray | None = None,
                batch_size: int = 1, pool: int = 0) -> np.ndarray:
    """The shuffled order of the ``n`` training songs in ``epoch`` (a function of both).

    With ``pool`` > 0 (and the songs' ``lengths``), batches of similar length: the shuffled
    songs are cut into pools of ``pool`` songs, each pool sorted by length and cut into
    batches of ``batch_size``, and the batches of the epoch shuffled. Every song still comes
    once per epoch; a batch pads much less than ``batch_size`` random songs do.
    """
    rng = np.random.default_rng([seed, 0, epoch])
    order = rng.permutation(n)
    if pool <= 0 or lengths is None:
        return order
    batches = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(np.asarray(lengths)[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))])


# --------------------------------------------------------------------------- device


def cpu_has_bf16() -> bool:
    """True if the CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        with contextlib.suppress(Exception):
            if probe is not None and probe():
                return True
    return False


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the device computes it natively, else fp32."""
    import torch

    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if precision == "auto":
        return "bf16" if supported else "fp32"
    if precision == "bf16" and not supported and device.type == "cuda":
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
    if precision == "bf16" and not supported:
        print("warning: this CPU has no bf16 instructions; bf16 will be emulated and slow",
              file=sys.stderr)
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 master weights) or nothing."""
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model: MMTModel,
    valid: Sequence[np.ndarray],
    batch_size: int,
    precision: str = "fp32",
) -> dict[str, float]:
    """Per-field next-token loss on real targets of the validation songs (token-weighted).

    Songs are batched in order of length (less padding); the result does not depend on
    the order beyond float rounding.
    """
    import torch

    from .model import field_losses

    device = next(model.parameters()).device
    sums = dict.fromkeys((*FIELDS, "total"), 0.0)
    count = 0
    order = sorted(range(len(valid)), key=lambda i: (len(valid[i]), i))
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        for i in range(0, len(order), batch_size):
            codes, mask = collate([valid[j] for j in order[i : i + batch_size]])
            codes, mask = codes.to(device), mask.to(device)
            logits, _ = model.net.run(codes, mask)
            n = int(mask[:, 1:].sum())
            for k, v in field_losses(logits, codes, mask).items():
                sums[k] += float(v) * n
            count += n
    model.train(was_training)
    return {k: v / count for k, v in sums.items()}

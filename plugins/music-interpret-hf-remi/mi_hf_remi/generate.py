"""Sampling continuations from the REMI language model, optionally with a patch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from music_interpret.plugin import Batch

if TYPE_CHECKING:
    from .adapter import HFRemiAdapter


def sample(adapter: HFRemiAdapter, prompt: np.ndarray, steps: int, *, seed: int,
           temperature: float, filter_thres: float, patch: Any = None) -> np.ndarray:
    """Up to ``steps`` new token ids after ``prompt`` (see :meth:`HFRemiAdapter.generate`)."""
    generator = torch.Generator(device=adapter._device).manual_seed(int(seed))
    tokens = [int(t) for t in prompt]
    new: list[int] = []
    limit = adapter.max_seq_len
    for _ in range(int(steps)):
        ids = torch.as_tensor([tokens[-limit:]], dtype=torch.long)
        logits = adapter._logits(Batch(ids, torch.ones_like(ids, dtype=torch.bool)), patch=patch)[0]
        assert logits is not None
        last = logits[0, -1].float() / max(float(temperature), 1e-6)
        last[adapter.vocab.pad] = -math.inf
        k = max(1, int(math.ceil((1 - filter_thres) * last.shape[-1])))
        top = torch.topk(last, k)
        probs = torch.softmax(top.values, -1)
        choice = int(top.indices[torch.multinomial(probs, 1, generator=generator)])
        tokens.append(choice)
        new.append(choice)
        if choice == adapter.vocab.eos:
            break
    return np.asarray(new, np.int64)

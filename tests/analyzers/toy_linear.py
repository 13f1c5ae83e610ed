"""A toy ``ModelAdapter`` whose logits are a linear read-out of its one hook activation.

The activation at hook ``h`` of token t is ``sum_f E_f[codes[t, f]]`` (no mixing across
positions); each field's logits are ``x @ R_f``. Used to plant a latent the read-out uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from music_interpret.adapters.mmt.model import FIELDS, field_losses
from music_interpret.interfaces import Batch, ModelAdapter

VOCAB = (5, 6, 7, 9, 5, 4)
D = 8


class LinearToy(ModelAdapter):
    """Embeddings ``E_f`` (V_f, D) and read-outs ``R_f`` (D, V_f), both given or random."""

    name = "linear_toy"

    def __init__(self, readout: dict[str, torch.Tensor] | None = None, seed: int = 0,
                 device: str = "cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.device = device
        self.emb = [torch.randn(v, D, generator=g).to(device) for v in VOCAB]
        self.readout = {f: (readout or {}).get(f, torch.randn(D, v, generator=g)).to(device)
                        for f, v in zip(FIELDS, VOCAB, strict=True)}

    def load(self, model_dir: Path, device: str = "cpu") -> None:
        """Nothing to load."""

    def hook_points(self) -> list[str]:
        return ["h"]

    def _x(self, batch: Batch) -> torch.Tensor:
        codes = torch.as_tensor(batch.codes, device=self.device)
        return sum(e[codes[..., i]] for i, e in enumerate(self.emb))  # type: ignore[return-value]

    def run_with_hooks(self, batch: Batch, hook_points: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"h": self._x(batch)}

    def patched_logits(self, batch: Batch, hook_point: str,
                       fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       ) -> dict[str, torch.Tensor]:
        x = self._x(batch)
        x = fn(x) if fn is not None else x
        return {f: x @ self.readout[f] for f in FIELDS}

    def run_with_patch(self, batch: Batch, hook_point: str,
                       fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.patched_logits(batch, hook_point, fn)
        mask = torch.as_tensor(batch.mask, device=self.device)
        codes = torch.as_tensor(batch.codes, device=self.device)
        return field_losses(list(logits.values()), codes, mask)

    def token_metadata(self, codes: np.ndarray) -> Mapping[str, np.ndarray]:
        return {"event_type": np.asarray(codes)[:, 0]}

    def label_target(self, attribute: str, value: str) -> tuple[str, list[int] | None]:
        """``next.toy=<code>``: pitch code ``<code>``, predicted directly; ``toy=*``: pitch."""
        if attribute == "next.toy":
            return "pitch", [int(value)]
        if attribute == "toy":
            return "pitch", None
        raise KeyError(attribute)


def toy_windows(n_songs: int, length: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """One window per song of random codes, note tokens (type 3) only, every token owned."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_songs):
        codes = np.stack([rng.integers(0, v, length) for v in VOCAB], axis=1).astype(np.int64)
        codes[:, 0] = 3
        out.append((codes, np.ones(length, bool), s))
    return out

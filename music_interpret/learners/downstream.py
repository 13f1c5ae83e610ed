"""Downstream loss: how much of the model's next-token performance a dictionary preserves.

On held-out songs the model runs three times per batch of windows, through
``adapter.run_with_patch`` at the dictionary's hook point:

* ``clean``: the activation untouched;
* ``spliced``: the activation replaced by the dictionary's reconstruction
  ``decode(encode(x))`` (raw activation space);
* ``ablated``: the activation replaced by its mean over the evaluated tokens
  (mean ablation).

For each of the six per-field cross-entropies and their sum ``total`` (means over
real targets, combined over batches weighted by their target counts) the
fraction of loss recovered is ``(L_ablated - L_spliced) / (L_ablated - L_clean)``:
1 when splicing costs nothing, 0 when it is as bad as the mean, ``None`` when
ablating does not hurt. The clean and ablated losses (and the mean) are computed
once and cached; each evaluation then costs one patched pass over at most
``max_windows`` windows / ``max_tokens`` tokens. With ``notes_only`` (dictionaries
trained on a store of note tokens only) splicing and ablation touch note tokens
only, and the mean is over note tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..interfaces import Batch

FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
KEYS = (*FIELDS, "total")
NOTE = 3  # type code of note events


@dataclass(frozen=True)
class DownstreamSettings:
    """How much held-out data an evaluation runs on."""

    max_windows: int = 32
    max_tokens: int = 32_768
    batch_size: int = 8

    def __post_init__(self) -> None:
        if min(self.max_windows, self.max_tokens, self.batch_size) < 1:
            raise ValueError("max_windows, max_tokens and batch_size must be positive")


def select_windows(adapter: Any, read: Callable[[str], np.ndarray], songs: Iterable[str],
                   settings: DownstreamSettings) -> list[np.ndarray]:
    """Codes (L, 6) of the first windows of ``songs`` (in order) within the settings' limits."""
    out: list[np.ndarray] = []
    tokens = 0
    for name in songs:
        _, windows = adapter.windows(read(name))
        for w in windows:
            if len(out) >= settings.max_windows or (out and tokens + len(w.codes) > settings.max_tokens):
                return out
            out.append(np.asarray(w.codes, np.int64))
            tokens += len(w.codes)
    return out


def make_batches(windows: Sequence[np.ndarray], batch_size: int) -> list[Batch]:
    """Padded batches of windows sorted by length (little padding)."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    batches = []
    for b in range(0, len(order), batch_size):
        wins = [windows[i] for i in order[b : b + batch_size]]
        t = max(len(w) for w in wins)
        codes = np.zeros((len(wins), t, wins[0].shape[1]), np.int64)
        mask = np.zeros((len(wins), t), bool)
        for j, w in enumerate(wins):
            codes[j, : len(w)] = w
            mask[j, : len(w)] = True
        batches.append(Batch(torch.from_numpy(codes), torch.from_numpy(mask)))
    return batches


class DownstreamEvaluator:
    """Clean / spliced / mean-ablated losses of ``adapter`` at ``hook`` on fixed batches.

    ``dictionary`` passed to :meth:`evaluate` acts on raw activations (``encode``,
    ``decode``); it must live on the adapter's device.
    """

    def __init__(self, adapter: Any, hook: str, batches: Sequence[Batch], *,
                 notes_only: bool = False) -> None:
        if not batches:
            raise ValueError("downstream evaluation needs at least one batch of windows")
        self.adapter, self.hook, self.batches = adapter, hook, list(batches)
        self.weights = [int(b.mask[:, 1:].sum()) for b in self.batches]
        self.where = [(b.mask & (b.codes[..., 0] == NOTE)) if notes_only else b.mask.clone()
                      for b in self.batches]
        self._clean: dict[str, float] | None = None
        self._ablated: dict[str, float] | None = None
        self._mean: torch.Tensor | None = None

    @classmethod
    def for_songs(cls, adapter: Any, hook: str, read: Callable[[str], np.ndarray],
                  songs: Iterable[str], settings: DownstreamSettings | None = None, *,
                  notes_only: bool = False) -> DownstreamEvaluator | None:
        """An evaluator on the first windows of ``songs``; None when they give no window."""
        settings = settings or DownstreamSettings()
        windows = select_windows(adapter, read, songs, settings)
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            return None
        return cls(adapter, hook, make_batches(windows, settings.batch_size), notes_only=notes_only)

    @property
    def tokens(self) -> int:
        """Tokens the patch replaces (real tokens, or note tokens with ``notes_only``)."""
        return int(sum(int(w.sum()) for w in self.where))

    def _losses(self, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, float]:
        total = {k: 0.0 for k in KEYS}
        for batch, where, w in zip(self.batches, self.where, self.weights, strict=True):
            patch = (lambda x: x) if fn is None else _masked(fn, where)
            out = self.adapter.run_with_patch(batch, self.hook, patch)
            for k in KEYS:
                total[k] += float(out[k]) * w
        n = max(sum(self.weights), 1)
        return {k: v / n for k, v in total.items()}

    def mean_activation(self) -> torch.Tensor:
        """Mean activation (d_model,) at the hook over the patched tokens of the batches."""
        if self._mean is None:
            acc, n = None, 0
            for batch, where in zip(self.batches, self.where, strict=True):
                x = self.adapter.run_with_hooks(batch, [self.hook])[self.hook].double()
                m = where.to(x.device)
                s = x[m].sum(0)
                acc, n = (s if acc is None else acc + s), n + int(m.sum())
            assert acc is not None
            self._mean = (acc / max(n, 1)).float()
        return self._mean

    def clean(self) -> dict[str, float]:
        if self._clean is None:
            self._clean = self._losses(None)
        return self._clean

    def ablated(self) -> dict[str, float]:
        if self._ablated is None:
            mean = self.mean_activation()
            self._ablated = self._losses(lambda x: mean.to(x).expand_as(x))
        return self._ablated

    @torch.no_grad()
    def evaluate(self, dictionary: torch.nn.Module) -> dict[str, Any]:
        """Per-field losses (clean, spliced, ablated) and the fraction of loss recovered."""
        spliced = self._losses(lambda x: dictionary(x.float()).to(x.dtype))
        clean, ablated = self.clean(), self.ablated()
        return {"hook_point": self.hook, "windows": sum(len(b.codes) for b in self.batches),
                "tokens": self.tokens, "targets": sum(self.weights), "clean": clean,
                "spliced": spliced, "ablated": ablated,
                "recovered": {k: recovered(clean[k], spliced[k], ablated[k]) for k in KEYS}}


def _masked(fn: Callable[[torch.Tensor], torch.Tensor],
            where: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` applied at the positions of ``where`` (B, T) only."""
    def patch(x: torch.Tensor) -> torch.Tensor:
        return torch.where(where.to(x.device)[..., None], fn(x).to(x.dtype), x)

    return patch


def recovered(clean: float, spliced: float, ablated: float) -> float | None:
    """(ablated - spliced) / (ablated - clean); None when ablation does not raise the loss."""
    gap = ablated - clean
    if not gap > 1e-9 or not math.isfinite(spliced):
        return None
    return (ablated - spliced) / gap


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of an evaluation: ``<field>_recovered``, ``<field>_ce_<kind>``."""
    out: dict[str, float] = {}
    for k in KEYS:
        value = result["recovered"].get(k)
        if value is not None:
            out[f"{k}_recovered"] = float(value)
        for kind in ("spliced", "clean", "ablated"):
            out[f"{k}_ce_{kind}"] = float(result[kind][k])
    return out

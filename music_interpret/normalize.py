"""Normalisation of stored activations (modes, parameters from the statistics, a copy).

* :class:`Normalizer`: ``apply(x) = (x - shift) * scale`` and its inverse, for the modes
  of :data:`MODES`: ``none``, ``standardize`` (per dimension, as the seed project did) and
  ``unit_mean_norm`` (mean L2 norm becomes sqrt(d_model)). The loader applies it on the fly.
* :func:`write_normalization` / :func:`load_normalizer`: ``normalization.json``.
* :func:`materialize` writes a normalised copy of a store, through the store plugin that
  reads it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import UserError
from .outputs import swap_into_place
from .stats import NORMALIZATION_FILE, STATS_FILE, check_stats_for, load_stats

if TYPE_CHECKING:
    import torch
    import xarray as xr

    from .interfaces import StoreReader

#: the normalisation modes (defined here once; configs and command lines take them from here)
Mode = Literal["none", "standardize", "unit_mean_norm"]
MODES: tuple[str, ...] = typing.get_args(Mode)
NONE, STANDARDIZE, UNIT_MEAN_NORM = MODES
#: ``auto``: the mode the preprocess stage chose (``normalization.json``), else none
AUTO = "auto"
ModeOrAuto = Literal["auto", Mode]
DEFAULT_MODE: Mode = "unit_mean_norm"
STD_EPS = 1e-12  # a dimension whose std is below this is centred but not scaled


@dataclass(frozen=True, eq=False)
class Normalizer:
    """``apply(x) = (x - shift) * scale``; ``invert(y) = y / scale + shift`` (per dimension).

    ``shift`` and ``scale`` are float64 vectors of length d_model, so that a learner can
    fold the normalisation into its weights.
    """

    mode: str
    hook: str
    shift: np.ndarray
    scale: np.ndarray

    @classmethod
    def identity(cls, d_model: int, hook: str = "") -> Normalizer:
        return cls(NONE, hook, np.zeros(d_model), np.ones(d_model))

    @classmethod
    def from_stats(cls, stats: str | Path | xr.Dataset, hook: str, mode: str) -> Normalizer:
        """The normaliser of ``hook`` for ``mode`` from a stats Dataset or file."""
        if mode not in MODES:
            raise UserError(f"normalization: {mode!r} is not a mode ({', '.join(MODES)})")
        ds = load_stats(stats)
        hooks = [str(h) for h in ds["hook"].values]
        if hook not in hooks:
            raise UserError(f"{ds.attrs.get('source_file', 'statistics')}: no statistics for hook "
                            f"point {hook!r} (have: {', '.join(hooks)})")
        s = ds.sel(hook=hook)
        d = s.sizes["d_model"]
        if mode == NONE:
            return cls.identity(d, hook)
        if mode == STANDARDIZE:
            std = np.asarray(s["std"].values, np.float64)
            scale = np.where(std > STD_EPS, 1.0 / np.maximum(std, STD_EPS), 1.0)
            return cls(mode, hook, np.asarray(s["mean"].values, np.float64), scale)
        mean_norm = float(s["mean_norm"])
        factor = math.sqrt(d) / mean_norm if mean_norm > STD_EPS else 1.0
        return cls(mode, hook, np.zeros(d), np.full(d, factor))

    @property
    def d_model(self) -> int:
        return len(self.scale)

    @property
    def is_identity(self) -> bool:
        return not self.shift.any() and bool((self.scale == 1).all())

    def apply(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalised copy of ``x`` (..., d_model), same type, dtype and device."""
        shift, scale = self._params(x)
        return (x - shift) * scale

    def invert(self, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Undo :meth:`apply`."""
        shift, scale = self._params(y)
        return y / scale + shift

    def apply_(self, x: np.ndarray) -> np.ndarray:
        """Normalise a float numpy array in place (no copy); returns it."""
        return self.apply_into(x, x)

    def apply_tensor_(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise a float32 CPU tensor in place, on every core; the values of :meth:`apply_`."""
        shift, scale = self.float32
        if shift is not None:
            t.sub_(shift)
        if scale is not None:
            t.mul_(scale)
        return t

    @cached_property
    def float32(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Shift and scale as float32 tensors (None where they change nothing)."""
        import torch

        shift = torch.from_numpy(self.shift.astype(np.float32)) if self.shift.any() else None
        scale = None if (self.scale == 1).all() else torch.from_numpy(self.scale.astype(np.float32))
        return shift, scale

    def apply_into(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write the normalised ``x`` into the float array ``out`` (one pass when possible)."""
        shift = self.shift.any()
        scale = not (self.scale == 1).all()
        if shift:
            np.subtract(x, self.shift.astype(out.dtype), out=out)
        if scale:
            np.multiply(out if shift else x, self.scale.astype(out.dtype), out=out)
        if not shift and not scale and out is not x:
            out[...] = x
        return out

    def _params(self, x: Any) -> tuple[Any, Any]:
        if isinstance(x, np.ndarray):
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
            return self.shift.astype(dtype), self.scale.astype(dtype)
        import torch

        dtype = x.dtype if x.is_floating_point() else torch.float32
        return (torch.as_tensor(self.shift, dtype=dtype, device=x.device),
                torch.as_tensor(self.scale, dtype=dtype, device=x.device))

    def describe(self) -> dict[str, Any]:
        """JSON description: how shift and scale derive from ``stats.nc``."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == STANDARDIZE:
            out.update(shift="mean", scale=f"1 / std (1 where std <= {STD_EPS})")
        elif self.mode == UNIT_MEAN_NORM:
            out.update(shift=0.0, scale="sqrt(d_model) / mean_norm", scale_value=float(self.scale[0]))
        else:
            out.update(shift=0.0, scale=1.0)
        return out


def write_normalization(path: str | Path, stats: xr.Dataset, mode: str,
                        stats_file: str = STATS_FILE) -> Path:
    """``normalization.json``: the mode and, per hook, how its parameters come from stats."""
    from .jsonio import write_json_atomic

    hooks = [str(h) for h in stats["hook"].values]
    data = {
        "mode": mode,
        "stats_file": stats_file,
        "store_id": stats.attrs["store_id"],
        "store_path": stats.attrs.get("store_path"),
        "hooks": {h: Normalizer.from_stats(stats, h, mode).describe() for h in hooks},
    }
    path = Path(path)
    write_json_atomic(path, data)
    return path


def load_normalizer(stats_dir: str | Path, hook: str, mode: str | None = None) -> Normalizer:
    """The normaliser a preprocess output folder describes (``mode`` overrides its mode)."""
    stats_dir = Path(stats_dir)
    config_path = stats_dir / NORMALIZATION_FILE
    if mode is None:
        try:
            mode = json.loads(config_path.read_text())["mode"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"{config_path}: missing or unreadable normalisation file") from None
    return Normalizer.from_stats(stats_dir / STATS_FILE, hook, str(mode))


def materialize(
    store: StoreReader,
    out_path: str | Path,
    mode: str,
    stats: str | Path | xr.Dataset | None = None,
    *,
    block_tokens: int = 65_536,
) -> Path:
    """Write a normalised copy of ``store`` to ``out_path`` (a store of the same plugin and layout).

    Every hook point is normalised with its own parameters; statistics are computed
    first when ``stats`` is not given. The copy is assembled in a temporary sibling
    folder and renamed into place when complete (an existing ``out_path`` is replaced).
    One source shard at a time is held in memory, as during extraction.
    """
    from .plugins import get_registry
    from .stats import compute_stats

    info = store
    if mode not in MODES:
        raise UserError(f"normalization: {mode!r} is not a mode ({', '.join(MODES)})")
    stats_ds = load_stats(stats) if stats is not None else compute_stats(info, block_tokens=block_tokens)
    check_stats_for(stats_ds, info)
    norms = [Normalizer.from_stats(stats_ds, h, mode) for h in info.hooks]
    out_path = Path(out_path)
    if out_path.resolve() == info.path.resolve():
        raise UserError(f"{out_path}: the normalised copy cannot overwrite its source store")
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cls = get_registry().get("activation_store", info.store_name)
    attrs = info.attrs
    attrs.update(normalization=mode, normalized_from=info.store_id, normalized_from_path=str(info.path))
    try:
        writer = cls(cls.Config(**info.writer_options())).create(
            tmp, hooks=info.hooks, d_model=info.d_model, songs=info.songs,
            sources=info.song_sources, attrs=attrs, resume=False, dtype=info.dtype)
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(info.blocks(h)) for h in info.hooks]
            for shard in info.shard_table:
                n = shard.tokens
                acts = np.empty((n, len(info.hooks), info.d_model), np.float32)
                for k, (norm, reader) in enumerate(zip(norms, readers, strict=True)):
                    for s, e, piece in reader.pieces(shard.index, 0, n):
                        norm.apply_into(piece, acts[s:e, k])
                writer.write_shard(acts, info.read_coords(shard.index), shard.song_start,
                                   shard.song_stop)
        writer.finish({**info.summary, "normalization": mode,
                       "normalized_from": info.store_id})
        swap_into_place(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path



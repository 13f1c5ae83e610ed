"""Activation statistics of a store (the library behind the ``preprocess`` stage).

:func:`compute_stats` streams over every shard of a store (a
:class:`~music_interpret.interfaces.StoreReader`), block by block (one hook's
``block_tokens`` x ``d_model`` at a time, never the whole store), and accumulates per-hook
moments in float64 with Chan's parallel merge of block moments: count, per-dimension mean
and (population, ddof=0) std, mean / std / max of the token L2 norms, and per-event-type
token counts (named by the store's event vocabulary). The fraction of outlier tokens
(norm > ``outlier_factor`` x mean norm) needs the final mean norm, so the per-token norms
(float64, 1/(2 d_model) of the activation bytes) are spilled to a temporary
memory-mapped file during the pass and counted exactly afterwards. :func:`write_stats` /
:func:`load_stats`: ``stats.nc`` (dims hook, d_model), written atomically.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import xarray as xr

    from .interfaces import StoreReader

STATS_DIR = "stats"
STATS_FILE = "stats.nc"
NORMALIZATION_FILE = "normalization.json"
_SUB_BLOCK = 16_384  # rows converted to float64 at once


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of a stream of vectors, in float64."""

    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s pairwise update with the moments of another batch."""
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean.copy(), m2.copy()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def add(self, x: np.ndarray) -> None:
        """Merge the rows of ``x`` (float64, (n, ...)) using a two-pass block estimate."""
        if len(x) == 0:
            return
        mean = x.mean(axis=0)
        dev = x - mean
        self.merge(len(x), mean, np.einsum("i...,i...->...", dev, dev))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0)."""
        return np.sqrt(self.m2 / max(self.count, 1))


@dataclass
class _HookAccumulator:
    """Streaming statistics of one hook point."""

    acts: Moments = field(default_factory=Moments)
    norms: Moments = field(default_factory=Moments)
    max_norm: float = 0.0

    def add(self, block: np.ndarray) -> np.ndarray:
        """Accumulate a float32 block (n, d_model); returns its float64 token norms."""
        out = np.empty(len(block), np.float64)
        for s in range(0, len(block), _SUB_BLOCK):
            x = block[s : s + _SUB_BLOCK].astype(np.float64)
            self.acts.add(x)
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            self.norms.add(norms)
            out[s : s + len(x)] = norms
        if len(out):
            self.max_norm = max(self.max_norm, float(out.max()))
        return out


def _blocks(n: int, block_tokens: int) -> list[tuple[int, int]]:
    return [(s, min(s + block_tokens, n)) for s in range(0, n, block_tokens)]


def compute_stats(
    store: StoreReader,
    hooks: Sequence[str] | None = None,
    *,
    outlier_factor: float = 4.0,
    block_tokens: int = 65_536,
    event_types: bool = True,
    progress: Any = None,
    scratch_dir: str | Path | None = None,
) -> xr.Dataset:
    """Per-hook statistics of a store as an ``xarray.Dataset`` (see :func:`write_stats`).

    ``progress`` is an optional tqdm-like object (``update(n_tokens)`` per block and hook).
    The per-token norms spill to a temporary file in ``scratch_dir`` (system temp folder
    by default) for the exact outlier count.
    """
    if outlier_factor <= 0:
        raise ValueError(f"outlier_factor must be positive, got {outlier_factor}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    info = store
    hooks = list(info.hooks if hooks is None else hooks)
    for h in hooks:
        info.hook_index(h)
    accs = {h: _HookAccumulator() for h in hooks}
    n_total = info.n_tokens
    events = info.vocabulary.events
    counts = np.zeros(len(events), np.int64)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mi-norms-", dir=scratch_dir))
        norms = {h: np.lib.format.open_memmap(Path(tmp) / f"{i}.npy", mode="w+", dtype=np.float64,
                                              shape=(n_total,)) for i, h in enumerate(hooks)}
        readers = {h: stack.enter_context(info.blocks(h)) for h in hooks}
        offset = 0
        for shard in info.shard_table:
            k, n = shard.index, shard.tokens
            if event_types:
                et = info.read_coords(k, ["event_type"])["event_type"].astype(np.int64)
                counts += np.bincount(et[et >= 0], minlength=len(events))[: len(events)]
            for start, stop in _blocks(n, block_tokens):
                for h in hooks:
                    block = readers[h].read(k, start, stop)
                    row_norms = accs[h].add(block)
                    if not np.isfinite(row_norms).all():
                        bad = int(np.flatnonzero(~np.isfinite(row_norms))[0]) + start
                        raise UserError(f"{info.path} shard {k}: token {bad} has NaN or infinite activations at "
                                        f"hook point {h}; the store is broken (extract it again)")
                    norms[h][offset + start : offset + stop] = row_norms
                    if progress is not None:
                        progress.update(stop - start)
            offset += n
        outliers = {}
        for h in hooks:
            threshold = outlier_factor * float(accs[h].norms.mean)
            hits = 0
            for start, stop in _blocks(n_total, 1 << 22):
                hits += int(np.count_nonzero(norms[h][start:stop] > threshold))
            outliers[h] = hits / max(n_total, 1)
            del norms[h]
    return _stats_dataset(info, hooks, accs, outliers, counts if event_types else None,
                          outlier_factor)


def _stats_dataset(info: StoreReader, hooks: list[str], accs: dict[str, _HookAccumulator],
                   outliers: dict[str, float], counts: np.ndarray | None,
                   outlier_factor: float) -> xr.Dataset:
    import xarray as xr

    from .version import __version__

    def per_hook(fn: Callable[[_HookAccumulator], Any]) -> np.ndarray:
        return np.asarray([fn(accs[h]) for h in hooks])

    data: dict[str, Any] = {
        "count": (("hook",), per_hook(lambda a: a.acts.count).astype(np.int64),
                  {"long_name": "number of tokens"}),
        "mean": (("hook", "d_model"), per_hook(lambda a: a.acts.mean),
                 {"long_name": "per-dimension mean"}),
        "std": (("hook", "d_model"), per_hook(lambda a: a.acts.std),
                {"long_name": "per-dimension standard deviation (population, ddof=0)"}),
        "mean_norm": (("hook",), per_hook(lambda a: float(a.norms.mean)),
                      {"long_name": "mean L2 norm of a token's activation"}),
        "norm_std": (("hook",), per_hook(lambda a: float(a.norms.std)),
                     {"long_name": "standard deviation of the token L2 norms (ddof=0)"}),
        "max_norm": (("hook",), per_hook(lambda a: a.max_norm),
                     {"long_name": "largest token L2 norm"}),
        "outlier_fraction": (("hook",), np.asarray([outliers[h] for h in hooks]),
                             {"long_name": "fraction of tokens with norm > outlier_factor x mean_norm"}),
    }
    coords: dict[str, Any] = {"hook": np.asarray(hooks, dtype=object),
                              "d_model": np.arange(info.d_model, dtype=np.int32)}
    if counts is not None:
        events = info.vocabulary.events
        data["event_type_count"] = (("event_type",), counts,
                                    {"long_name": "number of tokens per event type"})
        coords["event_type"] = np.arange(len(events), dtype=np.int8)
        coords["event_type_name"] = (("event_type",), np.asarray(events, dtype=object))
    attrs = {
        "Conventions": "CF-1.10",
        "title": "music-interpret activation statistics",
        "store_id": info.store_id,
        "store_path": str(info.path),
        "outlier_factor": float(outlier_factor),
        "n_tokens": int(info.n_tokens),
        "music_interpret_version": __version__,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def write_stats(stats: xr.Dataset, path: str | Path) -> Path:
    """Write ``stats`` as netCDF to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        stats.to_netcdf(tmp, engine="h5netcdf")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_stats(source: str | Path | xr.Dataset) -> xr.Dataset:
    """A stats Dataset from ``stats.nc``, a folder holding it, or an already loaded Dataset."""
    import xarray as xr

    if isinstance(source, xr.Dataset):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / STATS_FILE
    if not path.exists():
        raise UserError(f"{path}: statistics file not found (run the preprocess stage)")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            stats = ds.load()
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: unreadable statistics file ({str(exc).splitlines()[0]})") from None
    missing = [v for v in ("count", "mean", "std", "mean_norm") if v not in stats]
    if missing or "store_id" not in stats.attrs:
        raise UserError(f"{path}: not a statistics file (missing {', '.join(missing) or 'store_id'})")
    stats.attrs.setdefault("source_file", str(path))
    return stats


def check_stats_for(stats: xr.Dataset, info: StoreReader) -> None:
    """UserError when ``stats`` were computed on another store than ``info``."""
    if stats.attrs.get("store_id") != info.store_id:
        where = stats.attrs.get("source_file", "statistics")
        raise UserError(f"{where}: statistics belong to store {stats.attrs.get('store_id')} "
                        f"({stats.attrs.get('store_path')}), not to {info.path} "
                        f"(store_id {info.store_id})")



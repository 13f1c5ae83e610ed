"""Activation statistics and normalisation (the library behind the ``preprocess`` stage).

* :func:`compute_stats` streams over every shard of a store, block by block (one
  hook's ``block_tokens`` x ``d_model`` at a time, never the whole store), and
  accumulates per-hook moments in float64 with Chan's parallel merge of block
  moments: count, per-dimension mean and (population, ddof=0) std, mean / std / max
  of the token L2 norms, and per-event-type token counts. The fraction of outlier
  tokens (norm > ``outlier_factor`` x mean norm) needs the final mean norm, so the
  per-token norms (float64, 1/(2 d_model) of the activation bytes) are spilled to a
  temporary memory-mapped file during the pass and counted exactly afterwards.
* :func:`write_stats` / :func:`load_stats`: ``stats.nc`` (dims hook, d_model), written
  atomically.
* :class:`Normalizer`: ``apply(x) = (x - shift) * scale`` and its inverse, for modes
  ``none``, ``standardize`` (per dimension, as the seed project did) and
  ``unit_mean_norm`` (mean L2 norm becomes sqrt(d_model)). The loader applies it on the
  fly; :func:`materialize` writes a normalised copy of a store for those who want one.
* :class:`BlockReader`: fast contiguous reads of one hook point (used here and by the
  training loader).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import UserError
from .stores.info import H5_LOCK, open_h5, shard_variable
from .stores.netcdf import EVENT_TYPES, StoreInfo, check_store, read_coords
from .stores.schema import decode as decode_stored

if TYPE_CHECKING:
    import torch
    import xarray as xr

Mode = Literal["none", "standardize", "unit_mean_norm"]
MODES: tuple[str, ...] = ("none", "standardize", "unit_mean_norm")
STATS_FILE = "stats.nc"
NORMALIZATION_FILE = "normalization.json"
STD_EPS = 1e-12  # a dimension whose std is below this is centred but not scaled
_SUB_BLOCK = 16_384  # rows converted to float64 at once


# -- fast block reads -------------------------------------------------------------------


class BlockReader:
    """Reads token ranges of one hook point from a store's shards, fast, as float32.

    Same result as :func:`~music_interpret.stores.netcdf.read_block`, but shard files
    stay open through h5py (the ``max_open`` most recent) with the chunk cache off, so
    that whole chunks are read straight into the result (about 3x faster than through a
    64 MiB cache, which copies every chunk twice), in chunk-aligned pieces of about 8 MiB.
    16-bit stores are decoded to float32 piece by piece. Every HDF5 call holds ``lock``.
    """

    PIECE_BYTES = 8 << 20

    def __init__(self, shards: Sequence[Path], hook_index: int, d_model: int,
                 chunk_tokens: int = 4096, *, lock: Any = None, max_open: int = 4) -> None:

        self.shards = list(shards)
        self.hook_index = hook_index
        self.d_model = d_model
        per_piece = max(1, self.PIECE_BYTES // max(1, chunk_tokens * d_model * 4))
        self.piece = chunk_tokens * per_piece
        self.lock = lock if lock is not None else H5_LOCK
        self.max_open = max_open
        self._open: dict[int, Any] = {}  # shard index -> (File, dataset, dtype)

    def _var(self, shard: int) -> tuple[Any, str]:
        if shard in self._open:
            self._open[shard] = self._open.pop(shard)  # most recently used last
            return self._open[shard][1:]
        while len(self._open) >= self.max_open:
            oldest = next(iter(self._open))
            self._open.pop(oldest)[0].close()
        f = open_h5(self.shards[shard], rdcc_nbytes=0)
        var, dtype = shard_variable(f)
        self._open[shard] = (f, var, dtype)
        return var, dtype

    def pieces(self, shard: int, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Tokens [start, stop) of a shard as chunk-aligned float32 pieces ``(s, e, array)``."""
        s = start
        while s < stop:
            e = min(stop, (s // self.piece + 1) * self.piece)
            with self.lock:
                var, dtype = self._var(shard)
                piece = var[s:e, self.hook_index, :]
            yield s, e, decode_stored(piece, dtype)
            s = e

    def read_into(self, shard: int, start: int, stop: int, out: np.ndarray) -> None:
        """Tokens [start, stop) of shard ``shard`` into ``out`` (stop - start, d_model)."""
        for s, e, piece in self.pieces(shard, start, stop):
            out[s - start : e - start] = piece

    def read(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a shard as a new float32 array."""
        out = np.empty((stop - start, self.d_model), np.float32)
        self.read_into(shard, start, stop, out)
        return out

    def rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """The tokens ``rows`` (sorted, unique) of a shard."""
        with self.lock:
            var, dtype = self._var(shard)
            stored = var[np.asarray(rows, np.int64), self.hook_index, :] if len(rows) else \
                np.empty((0, self.d_model), var.dtype)
        return decode_stored(stored, dtype)

    def close(self) -> None:
        with self.lock:
            for f, _, _ in self._open.values():
                f.close()
            self._open.clear()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reader_for(info: StoreInfo, hook: str, lock: Any = None) -> BlockReader:
    """A :class:`BlockReader` over the shards of a checked store."""
    return BlockReader(info.shards, info.hook_index(hook), info.d_model,
                       int(info.manifest.get("chunk_tokens", 4096)), lock=lock)


# -- streaming moments ------------------------------------------------------------------


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
    store: str | Path | StoreInfo,
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
    info = store if isinstance(store, StoreInfo) else check_store(store)
    hooks = list(info.hooks if hooks is None else hooks)
    for h in hooks:
        info.hook_index(h)
    accs = {h: _HookAccumulator() for h in hooks}
    n_total = info.n_tokens
    counts = np.zeros(len(EVENT_TYPES), np.int64)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mi-norms-", dir=scratch_dir))
        norms = {h: np.lib.format.open_memmap(Path(tmp) / f"{i}.npy", mode="w+", dtype=np.float64,
                                              shape=(n_total,)) for i, h in enumerate(hooks)}
        readers = {h: stack.enter_context(reader_for(info, h)) for h in hooks}
        offset = 0
        for k, (shard, entry) in enumerate(zip(info.shards, info.manifest["shards"], strict=True)):
            n = int(entry["tokens"])
            if event_types:
                et = read_coords(shard, ["event_type"])["event_type"].astype(np.int64)
                counts += np.bincount(et[et >= 0], minlength=len(EVENT_TYPES))[: len(EVENT_TYPES)]
            for start, stop in _blocks(n, block_tokens):
                for h in hooks:
                    block = readers[h].read(k, start, stop)
                    row_norms = accs[h].add(block)
                    if not np.isfinite(row_norms).all():
                        bad = int(np.flatnonzero(~np.isfinite(row_norms))[0]) + start
                        raise UserError(f"{shard}: token {bad} has NaN or infinite activations at "
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


def _stats_dataset(info: StoreInfo, hooks: list[str], accs: dict[str, _HookAccumulator],
                   outliers: dict[str, float], counts: np.ndarray | None,
                   outlier_factor: float) -> xr.Dataset:
    import xarray as xr

    from . import __version__

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
        data["event_type_count"] = (("event_type",), counts,
                                    {"long_name": "number of tokens per MMT event type"})
        coords["event_type"] = np.arange(len(EVENT_TYPES), dtype=np.int8)
        coords["event_type_name"] = (("event_type",), np.asarray(EVENT_TYPES, dtype=object))
    attrs = {
        "Conventions": "CF-1.10",
        "title": "music-interpret activation statistics",
        "store_id": info.manifest["store_id"],
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


def check_stats_for(stats: xr.Dataset, info: StoreInfo) -> None:
    """UserError when ``stats`` were computed on another store than ``info``."""
    if stats.attrs.get("store_id") != info.manifest["store_id"]:
        where = stats.attrs.get("source_file", "statistics")
        raise UserError(f"{where}: statistics belong to store {stats.attrs.get('store_id')} "
                        f"({stats.attrs.get('store_path')}), not to {info.path} "
                        f"(store_id {info.manifest['store_id']})")


# -- normalisation ----------------------------------------------------------------------


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
        return cls("none", hook, np.zeros(d_model), np.ones(d_model))

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
        if mode == "none":
            return cls.identity(d, hook)
        if mode == "standardize":
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
        if self.mode == "standardize":
            out.update(shift="mean", scale=f"1 / std (1 where std <= {STD_EPS})")
        elif self.mode == "unit_mean_norm":
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


# -- normalised copy --------------------------------------------------------------------


def materialize(
    store: str | Path,
    out_path: str | Path,
    mode: str,
    stats: str | Path | xr.Dataset | None = None,
    *,
    block_tokens: int = 65_536,
) -> Path:
    """Write a normalised copy of ``store`` to ``out_path`` (same netCDF store format).

    Every hook point is normalised with its own parameters; statistics are computed
    first when ``stats`` is not given. The copy is assembled in a temporary sibling
    folder and renamed into place when complete (an existing ``out_path`` is replaced).
    One source shard at a time is held in memory, as during extraction.
    """
    from .stores.netcdf import NetCDFStore, NetCDFStoreConfig

    info = check_store(store)
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
    m = info.manifest
    config = NetCDFStoreConfig(chunk_tokens=int(m.get("chunk_tokens", 4096)))
    attrs = dict(m.get("attrs", {}))
    attrs.update(normalization=mode, normalized_from=m["store_id"], normalized_from_path=str(info.path))
    try:
        writer = NetCDFStore(config).create(tmp, hooks=info.hooks, d_model=info.d_model,
                                            songs=info.songs, sources=info.song_sources,
                                            attrs=attrs, resume=False, dtype=info.dtype)
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(reader_for(info, h)) for h in info.hooks]
            for i, (shard, entry) in enumerate(zip(info.shards, m["shards"], strict=True)):
                n = int(entry["tokens"])
                acts = np.empty((n, len(info.hooks), info.d_model), np.float32)
                for k, (norm, reader) in enumerate(zip(norms, readers, strict=True)):
                    for s, e, piece in reader.pieces(i, 0, n):
                        norm.apply_into(piece, acts[s:e, k])
                writer.write_shard(acts, read_coords(shard), entry["song_start"], entry["song_stop"])
        writer.finish({**m.get("summary", {}), "normalization": mode, "normalized_from": m["store_id"]})
        if out_path.exists():
            old = out_path.with_name(f".{out_path.name}.{os.getpid()}.old")
            os.replace(out_path, old)
            os.replace(tmp, out_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


# -- seed-compatible command ---------------------------------------------------------------

def _parser() -> Any:
    import argparse

    from .seedcli import add_common

    p = argparse.ArgumentParser(prog="python -m music_interpret.preprocess",
                                description="Statistics and normalisation of an activation store "
                                "(data/activations/<dataset_name>/<data_repr>/ -> its stats/ folder).")
    add_common(p)
    p.add_argument("--layers", type=int, nargs="*", default=[],
                   help="check that resid_post.L was extracted (statistics cover every hook)")
    p.add_argument("--normalization", choices=("none", "standardize", "unit_mean_norm"),
                   default="unit_mean_norm")
    p.add_argument("--outlier-factor", type=float, default=4.0)
    p.add_argument("--materialize", action="store_true", help="also write a normalised copy")
    return p


def _run_cli(argv: list[str] | None) -> int:
    from .seedcli import run_seed, seed_pipeline, store_path
    from .stores.netcdf import check_store

    ns = _parser().parse_args(argv)
    store = store_path(ns)
    info = check_store(store)
    for layer in ns.layers:
        info.hook_index(f"resid_post.{layer}")
    sections = {"extract": {"output": str(store)},
                "preprocess": {"normalization": ns.normalization, "outlier_factor": ns.outlier_factor,
                               "materialize": ns.materialize}}
    run_seed(seed_pipeline(ns, ["extract", "preprocess"], sections), ["preprocess"], ns.force, ns.root)
    print(store / "stats")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m music_interpret.preprocess <dataset_name> <data_repr> --layers 0 1 2 3``."""
    from .seedcli import guarded_main

    return guarded_main(_run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())

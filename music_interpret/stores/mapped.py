"""Memory-mapped activations: zero-copy row access to contiguous netCDF shards.

A shard written with ``layout: contiguous`` keeps its activations as one HDF5
contiguous block of little-endian float32 (token, hook, d_model). h5py gives the
block's byte offset in the file, and :func:`map_store` maps it read-only
(copy-on-write) with :class:`numpy.memmap`: a training batch is then one gather from
the page cache, with no HDF5 read and no intermediate copy.

Mapping is refused (:class:`NotMappable`, with the reason) for chunked, filtered or
compressed activations, unallocated data, a block that would run past the end of the
file, or when the mapped rows disagree with the rows netCDF reads (checked on the
first and last token of every shard). A mapped file must not be truncated in place
while it is mapped (the OS would stop the process with SIGBUS); stores are only ever
replaced by renaming, which is safe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .netcdf import StoreInfo, read_block


class NotMappable(Exception):
    """The activations of a shard cannot be memory-mapped (the message says why)."""


def map_shard(shard: Path, n_tokens: int, n_hooks: int, d_model: int) -> np.ndarray:
    """The activations of one shard as a read-only (n_tokens, n_hooks, d_model) memmap."""
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise NotMappable(f"h5py is not installed ({exc})") from None
    try:
        with h5py.File(shard, "r", locking=False) as f:
            ds = f["activations"]
            if ds.chunks is not None:
                raise NotMappable(f"{shard}: activations are chunked, not contiguous")
            if ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None:
                raise NotMappable(f"{shard}: activations are filtered or compressed")
            if ds.dtype != np.dtype("<f4"):
                raise NotMappable(f"{shard}: activations are {ds.dtype}, not little-endian float32")
            if ds.shape != (n_tokens, n_hooks, d_model):
                raise NotMappable(f"{shard}: activations have shape {ds.shape}, "
                                  f"expected {(n_tokens, n_hooks, d_model)}")
            offset = ds.id.get_offset()
    except (OSError, KeyError) as exc:
        raise NotMappable(f"{shard}: {exc}") from None
    if offset is None:
        raise NotMappable(f"{shard}: activations have no storage allocated")
    if offset + 4 * n_tokens * n_hooks * d_model > shard.stat().st_size:
        raise NotMappable(f"{shard}: activation block runs past the end of the file (truncated?)")
    return np.memmap(shard, dtype="<f4", mode="c", offset=offset, shape=(n_tokens, n_hooks, d_model))


def map_store(info: StoreInfo) -> list[np.ndarray]:
    """Memmaps of every shard of a checked store, verified against netCDF reads."""
    maps = []
    for shard, entry in zip(info.shards, info.manifest["shards"], strict=True):
        n = int(entry["tokens"])
        mapped = map_shard(shard, n, len(info.hooks), info.d_model)
        for h in range(len(info.hooks)):
            for t in {0, n - 1}:
                if not np.array_equal(mapped[t, h], read_block(shard, h, t, t + 1)[0], equal_nan=True):
                    raise NotMappable(f"{shard}: mapped activations differ from the netCDF read")
        maps.append(mapped)
    return maps

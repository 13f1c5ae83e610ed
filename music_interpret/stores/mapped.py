"""Memory-mapped activations: zero-copy row access to the shards of a netCDF store.

The ``netcdf`` store writes activations uncompressed and aligned to 4 KiB, either in
chunks of ``(chunk_tokens, 1, d_model)`` (one hook point each, the default) or as one
contiguous (token, hook, d_model) block. Either way every chunk is a run of whole
little-endian rows in the file (float32, or the uint16 bit patterns of float16 /
bfloat16 activations, which the loader views as torch half / bfloat16 rows): h5py gives the chunks' byte offsets,
:func:`map_store` maps the byte range that holds them read-only (copy-on-write) with
:class:`numpy.memmap`, and :meth:`MappedShard.row_index` turns (token, hook) into a
row of it. A training batch is then one gather from the page cache, with no HDF5
read and no intermediate copy; :func:`music_interpret.rowmaps.join_maps` puts every
shard's map side by side in one address range.

Mapping is refused (:class:`NotMappable`, with the reason) for compressed or filtered
activations, chunks of another shape or not on whole rows, unallocated data, a range
that would run past the end of the file, or when the mapped rows disagree with the
rows h5py reads (checked on the first, middle and last token of every hook of every shard).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..rowmaps import (  # noqa: F401 - re-exported: the generic side of the maps
    JoinedRows,
    MappedShard,
    NotMappable,
    _first_row,
    _placements,
    join_maps,
)
from . import schema
from .h5 import H5_LOCK, open_h5, read_block, shard_variable

if TYPE_CHECKING:
    from .info import StoreInfo


def _layout(ds: Any, shard: Path, n: int, n_hooks: int, d_model: int
            ) -> tuple[int, int, int, np.ndarray]:
    """(byte offset, rows, chunk, chunk starts) of the mapped activation rows."""
    row_bytes = ds.dtype.itemsize * d_model
    if ds.chunks is None:
        offset = ds.id.get_offset()
        if offset is None:
            raise NotMappable(f"{shard}: activations have no storage allocated")
        return offset, n * n_hooks, 0, np.zeros(0, np.int64)
    chunk = ds.chunks[0]
    if ds.chunks != (chunk, 1, d_model):
        raise NotMappable(f"{shard}: activation chunks {ds.chunks} are not (tokens, 1, d_model)")
    offsets = []
    for k in range(-(-n // chunk) * n_hooks):
        info = ds.id.get_chunk_info_by_coord(((k // n_hooks) * chunk, k % n_hooks, 0))
        if info.byte_offset is None or info.size != chunk * row_bytes or info.filter_mask:
            raise NotMappable(f"{shard}: activation chunk {k} is missing, filtered or resized")
        offsets.append(info.byte_offset)
    base = min(offsets)
    starts = (np.asarray(offsets, np.int64) - base) // row_bytes
    ordered = np.sort(np.asarray(offsets, np.int64))
    if any((o - base) % row_bytes for o in offsets) or (np.diff(ordered) < chunk * row_bytes).any():
        raise NotMappable(f"{shard}: activation chunks do not lie on whole rows")
    return base, int(starts.max()) + chunk, chunk, starts


def map_shard(shard: Path, n_tokens: int, n_hooks: int, d_model: int) -> MappedShard:
    """The activations of one shard, memory-mapped (see the module docstring)."""
    try:
        with H5_LOCK, open_h5(shard) as f:
            ds, dtype = shard_variable(f)
            if ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None:
                raise NotMappable(f"{shard}: activations are filtered or compressed")
            want = np.dtype("<f4" if dtype == "float32" else "<u2")
            if ds.dtype != want:
                raise NotMappable(f"{shard}: activations are {ds.dtype}, not little-endian {want}")
            if ds.shape != (n_tokens, n_hooks, d_model):
                raise NotMappable(f"{shard}: activations have shape {ds.shape}, "
                                  f"expected {(n_tokens, n_hooks, d_model)}")
            offset, n_rows, chunk, starts = _layout(ds, shard, n_tokens, n_hooks, d_model)
    except (OSError, KeyError) as exc:
        raise NotMappable(f"{shard}: {exc}") from None
    if offset + want.itemsize * n_rows * d_model > shard.stat().st_size:
        raise NotMappable(f"{shard}: activation rows run past the end of the file (truncated?)")
    rows = np.memmap(shard, dtype=want, mode="c", offset=offset, shape=(n_rows, d_model))
    return MappedShard(rows, chunk, n_hooks, starts, dtype)


def map_store(info: StoreInfo) -> list[MappedShard]:
    """Every shard of a checked store, memory-mapped and verified against HDF5 reads."""
    maps = []
    for shard, entry in zip(info.shards, info.manifest["shards"], strict=True):
        n = int(entry["tokens"])
        mapped = map_shard(shard, n, len(info.hooks), info.d_model)
        ends = np.asarray(sorted({0, n // 2, n - 1}), np.int64)
        for h in range(len(info.hooks) if n else 0):  # (an empty shard has nothing to check)
            got = schema.decode(mapped.rows[mapped.row_index(ends, h)], mapped.dtype)
            want = np.concatenate([read_block(shard, h, int(t), int(t) + 1) for t in ends])
            if not np.array_equal(got, want, equal_nan=True):
                raise NotMappable(f"{shard}: mapped activations differ from the HDF5 read")
        maps.append(mapped)
    return maps

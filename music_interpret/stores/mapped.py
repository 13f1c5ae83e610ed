"""Memory-mapped activations: zero-copy row access to the shards of a netCDF store.

The ``netcdf`` store writes activations uncompressed and aligned to 4 KiB, either in
chunks of ``(chunk_tokens, 1, d_model)`` (one hook point each, the default) or as one
contiguous (token, hook, d_model) block. Either way every chunk is a run of whole
little-endian rows in the file (float32, or the uint16 bit patterns of float16 /
bfloat16 activations, which the loader views as torch half / bfloat16 rows): h5py gives the chunks' byte offsets,
:func:`map_store` maps the byte range that holds them read-only (copy-on-write) with
:class:`numpy.memmap`, and :meth:`MappedShard.row_index` turns (token, hook) into a
row of it. A training batch is then one gather from the page cache, with no HDF5
read and no intermediate copy. On 64-bit Linux :func:`join_maps` maps every shard
again, side by side in one reserved address range (``mmap`` with ``MAP_FIXED``
through ctypes), so that a batch drawing from many shards is still one gather;
each shard is placed where its file offset and its address agree modulo the huge
page size, which keeps the kernel's huge-page mappings of the page cache.

Mapping is refused (:class:`NotMappable`, with the reason) for compressed or filtered
activations, chunks of another shape or not on whole rows, unallocated data, a range
that would run past the end of the file, or when the mapped rows disagree with the
rows h5py reads (checked on the first, middle and last token of every hook of every shard). A
mapped file must not be truncated in place while it is mapped (the OS would stop the
process with SIGBUS); stores are only ever replaced by renaming, which is safe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import schema
from .info import H5_LOCK, StoreInfo, open_h5, read_block, shard_variable


class NotMappable(Exception):
    """The activations of a shard cannot be memory-mapped (the message says why)."""


@dataclass(frozen=True)
class MappedShard:
    """A shard's activation rows in a memory map.

    ``rows`` is (R, d_model), in the stored form (``dtype``: float32 rows, or uint16 bit
    patterns of float16 / bfloat16). Contiguous layout (``chunk == 0``): the row of token
    ``t`` and hook ``h`` is ``t * n_hooks + h``. Chunked: ``starts[c * n_hooks + h]``
    is the first row of the chunk holding tokens ``c * chunk ...`` of hook ``h``, and
    the row is ``starts[...] + t % chunk``.
    """

    rows: np.ndarray
    chunk: int
    n_hooks: int
    starts: np.ndarray
    dtype: str = "float32"

    def row_index(self, tokens: np.ndarray, hook: int) -> np.ndarray:
        """Rows of ``tokens`` (int64 token indices of the shard) for hook index ``hook``."""
        if self.chunk == 0:
            return tokens * self.n_hooks + hook
        return self.starts[(tokens // self.chunk) * self.n_hooks + hook] + tokens % self.chunk


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


# -- every shard in one address range ------------------------------------------------------

_HUGE = 2 << 20  # a huge page: shards placed congruent to it can be mapped with huge pages
_MAP_FIXED = 0x10  # Linux
_MAP_NORESERVE = 0x4000  # Linux


@dataclass(frozen=True)
class JoinedRows:
    """The mapped rows of every shard in one (rows, d_model) array.

    Shard ``k``'s mapped row ``r`` is ``rows[first[k] + r]``; rows between shards are
    unmapped padding and must never be read. One array lets a batch that mixes shards
    be a single gather, in any order.
    """

    rows: np.ndarray
    first: np.ndarray  # int64 per shard
    dtype: str = "float32"


def _first_row(row_bytes: int, target: int, modulus: int, lower: int) -> int | None:
    """Smallest ``r >= lower`` with ``r * row_bytes % modulus == target % modulus``, or None."""
    from math import gcd

    g = gcd(row_bytes, modulus)
    if target % g:
        return None
    m = modulus // g
    r0 = (target % modulus) // g * pow(row_bytes // g, -1, m) % m if m > 1 else 0
    return lower + (r0 - lower) % m


class _Place(NamedTuple):
    first: int  # the shard's first row in the joined range
    start: int  # its mapping: start (bytes from the range's base) and length
    length: int
    copy: bool  # rows copied into anonymous memory rather than mapped from the file


def _placements(maps: list[MappedShard], row_bytes: int, page: int) -> list[_Place]:
    """Where each shard goes in the joined range.

    A shard's file mapping must start on a page whose file offset is congruent to
    its address (mod the page size, and where possible mod the huge page size).
    Where no row satisfies that (rows at an offset that is not a whole number of rows
    from a page boundary, as in small unaligned files), the rows are copied instead.
    """
    out, end = [], 0
    for m in maps:
        offset, size = int(m.rows.offset), m.rows.shape[0] * row_bytes
        lead = offset % page
        lower = -(-(end + lead) // row_bytes)
        first = _first_row(row_bytes, offset, _HUGE, lower)
        if first is None:
            first = _first_row(row_bytes, offset, page, lower)
        copy = first is None
        if first is None:  # any row will do: the anonymous pages start before it
            first = -(-end // row_bytes)
            lead = first * row_bytes % page
        start = first * row_bytes - lead
        length = -(-(lead + size) // page) * page
        out.append(_Place(first, start, length, copy))
        end = start + length
    return out


def join_maps(maps: list[MappedShard], max_copy_bytes: int = 256 << 20) -> JoinedRows:
    """Map every shard's rows again, side by side in one reserved address range (Linux).

    Shards whose rows cannot be mapped in place (see :func:`_placements`) are copied,
    up to ``max_copy_bytes`` in all.
    """
    import ctypes
    import mmap as mm
    import os
    import weakref

    if not sys.platform.startswith("linux") or sys.maxsize < 2**32 or not maps:
        raise NotMappable("joined maps need 64-bit Linux")
    d_model, dtype = maps[0].rows.shape[1], maps[0].rows.dtype
    if any(m.rows.dtype != dtype for m in maps):
        raise NotMappable("shards store activations in different dtypes")
    row_bytes, page = dtype.itemsize * d_model, mm.PAGESIZE
    places = _placements(maps, row_bytes, page)
    copied = sum(m.rows.nbytes for m, place in zip(maps, places, strict=True) if place.copy)
    if copied > max_copy_bytes:
        raise NotMappable(f"{copied} bytes of activations are not page-aligned (written by an older "
                          "version?): too many to copy")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    failed = ctypes.c_void_p(-1).value
    size = places[-1].start + places[-1].length + _HUGE
    reserved = libc.mmap(None, size, 0, mm.MAP_PRIVATE | mm.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if reserved in (None, failed):
        raise NotMappable(f"cannot reserve {size} bytes of address space: {os.strerror(ctypes.get_errno())}")
    base = -(-reserved // _HUGE) * _HUGE
    rw = mm.PROT_READ | mm.PROT_WRITE
    try:
        for m, place in zip(maps, places, strict=True):
            if place.copy:
                got = libc.mmap(base + place.start, place.length, rw,
                                mm.MAP_PRIVATE | mm.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
            else:
                offset = int(m.rows.offset)
                fd = os.open(m.rows.filename, os.O_RDONLY)
                try:
                    got = libc.mmap(base + place.start, place.length, rw, mm.MAP_PRIVATE | _MAP_FIXED,
                                    fd, offset - offset % page)
                finally:
                    os.close(fd)
            if got != base + place.start:
                raise NotMappable(f"{m.rows.filename}: {os.strerror(ctypes.get_errno())}")
    except BaseException:
        libc.munmap(reserved, size)
        raise
    n_rows = places[-1].first + maps[-1].rows.shape[0]
    memory = (ctypes.c_char * (n_rows * row_bytes)).from_address(base)
    unmap = weakref.finalize(memory, libc.munmap, reserved, size)  # with the last view of it
    unmap.atexit = False  # at exit the OS unmaps it; no late reader can then touch freed pages
    rows = np.frombuffer(memory, dtype=dtype).reshape(n_rows, d_model)
    joined = JoinedRows(rows, np.asarray([p.first for p in places], np.int64), maps[0].dtype)
    for m, place in zip(maps, places, strict=True):
        if place.copy:
            rows[place.first : place.first + m.rows.shape[0]] = m.rows
        n = m.rows.shape[0]
        ends = np.asarray(sorted({0, n // 2, n - 1}) if n else [], np.int64)
        if not np.array_equal(rows[place.first + ends], m.rows[ends], equal_nan=True):
            raise NotMappable(f"{m.rows.filename}: joined rows differ from the shard's map")
    return joined

"""Zero-copy rows of stored activations: a shard's rows in a memory map, and every
shard's rows side by side in one address range.

A store that can lay its activations out as whole little-endian rows on disk (the
``netcdf`` store, :mod:`music_interpret.stores.mapped`) hands them to the training loader
as :class:`MappedShard` objects (``StoreReader.map_shards``). On 64-bit Linux
:func:`join_maps` maps every shard again, side by side in one reserved address range
(``mmap`` with ``MAP_FIXED`` through ctypes), so that a batch drawing from many shards
is still one gather; each shard is placed where its file offset and its address agree
modulo the huge page size, which keeps the kernel's huge-page mappings of the page
cache. A mapped file must not be truncated in place while it is mapped (the OS would
stop the process with SIGBUS); stores are only ever replaced by renaming, which is safe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


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


def rows_tensor(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Mapped rows as a tensor of the stored precision (16-bit bit patterns viewed as such)."""
    import torch

    if dtype == "float32":
        return torch.from_numpy(rows)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return torch.from_numpy(rows.view(np.int16)).view(torch_dtype)

"""Gathering mapped activation rows into float32 batches (the loader's mapped path).

A batch is ``dest[i] = float32(rows[index[i]])``. One ``torch.index_select`` over the
whole batch runs on torch's intra-op (OpenMP) threads, whose barrier waits for every
thread: on a busy machine, where a thread is often descheduled, that wait dominates.
Rows stored as float16 / bfloat16 must also be widened to float32, and doing that as a
second pass over the batch costs a round trip through memory. :class:`Gatherer` splits
a batch into one contiguous part per thread of a small pool; each thread gathers (and
widens) its part in pieces of at most ``PIECE_ELEMENTS`` values, below torch's parallel
grain so that every op runs inline, and normalises it while it is in cache: one pass
over the batch memory, no barrier but the batch's own join. On the 2-core benchmark machine under load this delivered 4-6x the
tokens/s of the single ``index_select`` (``bench/loader_dtype.py``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PIECE_ELEMENTS = 32_768  # torch's GRAIN_SIZE: smaller ops are not split across threads


class Gatherer:
    """``dest[i] = (float32(rows[index[i]]) - shift) * scale`` for float32 or 16-bit ``rows``,
    on ``threads`` threads (``shift`` / ``scale``: the loader's normalisation, or None)."""

    def __init__(self, d_model: int, dtype: torch.dtype, threads: int | None = None) -> None:
        import torch

        self.threads = max(1, min(8, threads or torch.get_num_threads()))
        self.piece = max(1, PIECE_ELEMENTS // d_model)
        wide = dtype == torch.float32
        self._narrow = [None if wide else torch.empty((self.piece, d_model), dtype=dtype)
                        for _ in range(self.threads)]
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="widen") \
            if self.threads > 1 else None

    def __call__(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor,
                 shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        n = len(dest)
        args = (rows, index, dest, shift, scale)
        if self._pool is None or n <= self.piece:
            self._part(*args, 0, n, 0)
            return
        bounds = [n * k // self.threads for k in range(self.threads + 1)]
        futures = [self._pool.submit(self._part, *args, bounds[k], bounds[k + 1], k)
                   for k in range(self.threads)]
        for future in futures:
            future.result()

    def _part(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor,
              shift: torch.Tensor | None, scale: torch.Tensor | None,
              start: int, stop: int, slot: int) -> None:
        import torch

        narrow = self._narrow[slot]
        for s in range(start, stop, self.piece):
            e = min(stop, s + self.piece)
            out = dest[s:e]
            if narrow is None:
                torch.index_select(rows, 0, index[s:e], out=out)
            else:
                part = narrow[: e - s]
                torch.index_select(rows, 0, index[s:e], out=part)
                out.copy_(part)
            if shift is not None:  # normalised while the piece is in cache
                out.sub_(shift)
            if scale is not None:
                out.mul_(scale)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

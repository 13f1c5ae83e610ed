"""Gathering 16-bit activation rows into float32 batches (the loader's mapped path).

A float32 store's batch is one ``torch.index_select`` from the mapped rows. Rows
stored as float16 / bfloat16 must also be widened to float32; doing that as a second
pass over the whole batch costs a round trip through memory, and doing it in small
cache-resident pieces through torch's intra-op threads costs a thread barrier per piece,
which on a busy machine (threads waiting for a descheduled peer) is far slower than the
work itself. :class:`Widener` therefore splits a batch into one contiguous part per
thread of a small pool, and each thread gathers and widens its part in pieces of at most
``PIECE_ELEMENTS`` values (below torch's parallel grain, so every op runs inline):
one pass over the batch memory, no barriers but the batch's own join.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PIECE_ELEMENTS = 32_768  # torch's GRAIN_SIZE: smaller ops are not split across threads


class Widener:
    """``dest[i] = float32(rows[index[i]])`` for 16-bit ``rows``, on ``threads`` threads."""

    def __init__(self, d_model: int, dtype: torch.dtype, threads: int | None = None) -> None:
        import torch

        self.threads = max(1, min(8, threads or torch.get_num_threads()))
        self.piece = max(1, PIECE_ELEMENTS // d_model)
        self._narrow = [torch.empty((self.piece, d_model), dtype=dtype) for _ in range(self.threads)]
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="widen") \
            if self.threads > 1 else None

    def __call__(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor) -> None:
        n = len(dest)
        if self._pool is None or n <= self.piece:
            self._part(rows, index, dest, 0, n, 0)
            return
        bounds = [n * k // self.threads for k in range(self.threads + 1)]
        futures = [self._pool.submit(self._part, rows, index, dest, bounds[k], bounds[k + 1], k)
                   for k in range(self.threads)]
        for future in futures:
            future.result()

    def _part(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor,
              start: int, stop: int, slot: int) -> None:
        import torch

        narrow = self._narrow[slot]
        for s in range(start, stop, self.piece):
            e = min(stop, s + self.piece)
            part = narrow[: e - s]
            torch.index_select(rows, 0, index[s:e], out=part)
            dest[s:e].copy_(part)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

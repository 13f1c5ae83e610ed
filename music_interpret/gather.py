"""Gathering mapped activation rows into float32 batches (the loader's mapped path).

A batch is ``dest[i] = (float32(rows[index[i]]) - shift) * scale`` (``shift`` / ``scale``:
the loader's normalisation, if any). Two ways, bitwise the same:

* ``whole``: one ``torch.index_select`` over the batch (and, for 16-bit rows, one
  widening copy; for a normalisation, one subtraction and one multiplication), each on
  torch's intra-op (OpenMP) threads. Fastest when the cores are free, but every op ends
  in a barrier that waits for all threads: on a busy machine, where a thread is often
  descheduled, that wait dominates.
* ``pool``: the batch is split into one contiguous part per thread of a small pool;
  each thread gathers, widens and normalises its part in pieces of at most
  ``PIECE_ELEMENTS`` values, below torch's parallel grain so that every op runs inline
  and the piece stays in cache: one pass over the batch memory, no barrier but the
  batch's own join. On the 2-core benchmark machine under load it delivered 2-6x the
  tokens/s of ``whole`` (``bench/loader_dtype.py``, ``bench/loader.py``).

``auto`` (the default) times both on the first batches and keeps the faster, trying
the other again every ``RETRY`` batches, since the machine's load changes.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

PIECE_ELEMENTS = 32_768  # torch's GRAIN_SIZE: smaller ops are not split across threads
MODES = ("whole", "pool")
PROBES = 3  # batches timed in each mode before choosing
RETRY = 128  # batches between retries of the mode not chosen


class Gatherer:
    """Fills float32 batches from float32 or 16-bit ``rows`` (see the module doc)."""

    def __init__(self, d_model: int, dtype: torch.dtype, threads: int | None = None,
                 mode: Literal["auto", "whole", "pool"] = "auto") -> None:
        import torch

        self.threads = max(1, min(8, threads or torch.get_num_threads()))
        self.piece = max(1, PIECE_ELEMENTS // d_model)
        self.mode = mode
        self._dtype, self._d = dtype, d_model
        wide = dtype == torch.float32
        self._narrow = [None if wide else torch.empty((self.piece, d_model), dtype=dtype)
                        for _ in range(self.threads)]
        self._whole_narrow: torch.Tensor | None = None
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gather") \
            if self.threads > 1 else None
        self._times: dict[str, deque[float]] = {m: deque(maxlen=5) for m in MODES}
        self._calls = 0

    def __call__(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor,
                 shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        mode = self._choose()
        start = time.perf_counter()
        if mode == "whole":
            self._whole(rows, index, dest, shift, scale)
        else:
            self._pooled(rows, index, dest, shift, scale)
        if len(dest):
            self._times[mode].append((time.perf_counter() - start) / len(dest))
        self._calls += 1

    def _choose(self) -> str:
        if self.mode != "auto":
            return self.mode
        if self._pool is None:
            return "pool"  # one thread: pieces, inline (no barrier either way)
        if self._calls < 2 * PROBES:
            return MODES[self._calls % 2]
        best = min(MODES, key=lambda m: statistics.median(self._times[m]))
        if self._calls % RETRY == 0:
            return MODES[1 - MODES.index(best)]
        return best

    @property
    def chosen(self) -> str | None:
        """The mode in use (None before the probes are done)."""
        if self.mode != "auto":
            return self.mode
        if self._pool is None:
            return "pool"
        if self._calls < 2 * PROBES:
            return None
        return min(MODES, key=lambda m: statistics.median(self._times[m]))

    def _whole(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor,
               shift: torch.Tensor | None, scale: torch.Tensor | None) -> None:
        import torch

        if self._narrow[0] is None:
            torch.index_select(rows, 0, index, out=dest)
        else:
            if self._whole_narrow is None or len(self._whole_narrow) < len(dest):
                self._whole_narrow = torch.empty((len(dest), self._d), dtype=self._dtype)
            part = self._whole_narrow[: len(dest)]
            torch.index_select(rows, 0, index, out=part)
            dest.copy_(part)
        if shift is not None:
            dest.sub_(shift)
        if scale is not None:
            dest.mul_(scale)

    def _pooled(self, rows: torch.Tensor, index: torch.Tensor, dest: torch.Tensor,
                shift: torch.Tensor | None, scale: torch.Tensor | None) -> None:
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

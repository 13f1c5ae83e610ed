"""The loader's threads and memory: a prefetching thread, recycled batch memory and read
buffers, and the plan records (blocks, buffers) both delivery paths share."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class _Block:
    """Selected tokens of one read: shard tokens [start, stop), ``rows`` relative to start."""

    shard: int
    start: int
    stop: int
    rows: np.ndarray | None  # None: every token of the range
    key0: int  # global id of token ``start`` (shard offset + start)

    @property
    def n(self) -> int:
        return self.stop - self.start if self.rows is None else len(self.rows)

    def tokens(self) -> np.ndarray:
        """Token indices of the block in its shard."""
        local = np.arange(self.stop - self.start) if self.rows is None else self.rows
        return self.start + local.astype(np.int64)

    def keys(self) -> np.ndarray:
        """Global token ids of the block."""
        return self.tokens() + (self.key0 - self.start)


@dataclass(frozen=True)
class _Buffer:
    blocks: np.ndarray  # block ids read into this buffer
    perm: np.ndarray | None  # permutation of (carried tokens + new tokens); None: in order
    size: int  # carried + new tokens
    n_full: int  # full batches
    n_batches: int  # batches delivered (n_full, + 1 partial at the epoch's end)


@dataclass(frozen=True)
class _Filled:
    """A pool holding a buffer's new tokens after ``carry_len`` rows (and the carry, if fetched)."""

    buffer: _Buffer
    pool: np.ndarray
    carry_len: int
    first_batch: int
    has_carry: bool


class _BatchMemory:
    """Arrays that batches are written into, reused once no batch refers to them.

    A batch reaches the consumer as ``torch.from_numpy`` of one of these arrays (or of
    a leading slice of it). That tensor's storage, and so every view of it, holds a
    reference to the array: an array whose reference count is back at its baseline
    belongs to no live batch and may be overwritten. Reusing warm memory saves the page
    faults of a fresh 8 MiB allocation per batch, which cost about as much as the
    gather itself. At most ``limit`` arrays are kept; when all are in use (a consumer
    holding on to many batches), fresh arrays are handed out and not kept.
    """

    def __init__(self, rows: int, d_model: int, limit: int) -> None:
        self._shape = (rows, d_model)
        self._limit = limit
        self._arrays: list[np.ndarray] = []
        self._baseline = 0

    def take(self, rows: int) -> np.ndarray:
        """A float32 array of ``rows`` x d_model that no batch in use refers to."""
        for i in range(len(self._arrays)):
            if sys.getrefcount(self._arrays[i]) == self._baseline:
                return self._arrays[i][:rows]
        if len(self._arrays) >= self._limit:
            return np.empty((rows, self._shape[1]), np.float32)
        self._arrays.append(np.empty(self._shape, np.float32))
        self._baseline = sys.getrefcount(self._arrays[-1])
        return self._arrays[-1][:rows]


class _Pools:
    """Read buffers recycled between the stages (and kept by the loader between iterations)."""

    def __init__(self, n: int, rows: int, d_model: int, spare: list[np.ndarray]) -> None:
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._shape = (rows, d_model)
        self.arrays = [a for a in spare if a.shape == self._shape][:n]
        for a in self.arrays:
            self._free.put(a)
        self._left = n - len(self.arrays)

    def get(self, halt: threading.Event) -> np.ndarray | None:
        """A free pool (allocated on first use); None once ``halt`` is set."""
        if self._left and self._free.empty():
            self._left -= 1
            self.arrays.append(np.empty(self._shape, np.float32))
            return self.arrays[-1]
        while not halt.is_set():
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def put(self, pool: np.ndarray) -> None:
        self._free.put(pool)


_ITEM, _DONE, _ERROR = range(3)


class _Prefetcher:
    """Runs an iterator in a daemon thread, ``depth`` items ahead of its consumer.

    Setting ``stop`` (what :meth:`close` does) ends the thread's and the consumer's
    waiting loops; the source is closed in its own thread.
    """

    def __init__(self, source: Iterator[Any], depth: int, stop: threading.Event) -> None:
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=depth)
        self._stop = stop
        self.thread = threading.Thread(target=self._run, args=(source, self._queue, stop),
                                       name="ActivationLoader-prefetch", daemon=True)
        self.thread.start()

    @staticmethod
    def _run(source: Iterator[Any], q: queue.Queue[tuple[int, Any]], stop: threading.Event) -> None:
        def put(item: tuple[int, Any]) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in source:
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((_ERROR, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                kind, item = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set() or (not self.thread.is_alive() and self._queue.empty()):
                    return
                continue
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise item
            yield item

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread and wait for it (it finishes the read in progress first)."""
        self._stop.set()
        self.thread.join(timeout)

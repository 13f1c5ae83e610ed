"""The pooled path of :class:`~music_interpret.loader.ActivationLoader`: buffers of blocks
read through the store's block reader (``StoreReader.blocks``), normalised while
cache-warm, then permuted into batches; used for stores that cannot be memory-mapped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .threads import _BatchMemory, _Block, _Buffer, _Filled, _Pools

if TYPE_CHECKING:
    from ..interfaces import BlockSource, StoreReader
    from ..normalize import Normalizer


class PooledPath:
    """Batches cut from read buffers (mixed into the loader)."""

    info: StoreReader
    hook: str
    normalizer: Normalizer
    batch_size: int
    buffer_blocks: int
    n_tokens: int
    d_model: int
    _blocks: list[_Block]
    _counts: np.ndarray
    _offsets: np.ndarray
    _lock: Any

    def _plan(self, epoch: int) -> Iterator[_Buffer]:
        raise NotImplementedError

    def _pool_rows(self) -> int:
        """Rows of a read buffer: the largest carry plus the largest ``buffer_blocks`` blocks."""
        top = np.sort(self._counts)[::-1][: self.buffer_blocks].sum()
        return int(min(self.n_tokens, self.batch_size - 1 + top))

    def _read_stage(self, epoch: int, skip: int, pools: _Pools,
                    halt: threading.Event) -> Iterator[_Filled]:
        """Read (and normalise) the new blocks of each buffer into a pool, from batch ``skip`` on.

        Buffers whose batches were all delivered before ``skip`` are replayed on indices
        only; the carried tokens of the first buffer read are then fetched directly.
        """
        bs = self.batch_size
        carry_keys = np.empty(0, np.int64)
        done, fetch_carry = 0, skip > 0
        reader = self.info.blocks(self.hook, lock=self._lock)
        try:
            for buf in self._plan(epoch):
                carry_len = buf.size - int(self._counts[buf.blocks].sum())
                if done < skip and done + buf.n_batches <= skip:
                    keys = self._buffer_keys(carry_keys, buf)
                    carry_keys = keys[buf.n_full * bs :]
                    done += buf.n_batches
                    continue
                pool = pools.get(halt)
                if pool is None:  # halted
                    return
                offset = carry_len
                for i in buf.blocks:
                    offset += self._read_block(reader, self._blocks[i], pool[offset:])
                if fetch_carry:
                    pool[:carry_len] = self._fetch(reader, carry_keys)
                yield _Filled(buf, pool, carry_len, max(0, skip - done), fetch_carry)
                fetch_carry = False
                done += buf.n_batches
        finally:
            reader.close()

    def _batch_stage(self, filled: Iterator[_Filled], pools: _Pools,
                     memory: _BatchMemory) -> Iterator[np.ndarray]:
        """Put the carried tokens in front, permute by gathering, cut batches."""
        import torch

        bs = self.batch_size
        carry = np.empty((0, self.d_model), np.float32)
        for f in filled:
            buf, pool = f.buffer, f.pool
            if not f.has_carry:
                pool[: f.carry_len] = carry
            for b in range(f.first_batch, buf.n_batches):
                rows = slice(b * bs, min((b + 1) * bs, buf.size))
                out = memory.take(rows.stop - rows.start)
                if buf.perm is None:
                    np.copyto(out, pool[rows])
                else:
                    idx = torch.from_numpy(buf.perm[rows])
                    torch.index_select(torch.from_numpy(pool), 0, idx, out=torch.from_numpy(out))
                yield out
                del out
            tail = slice(buf.n_full * bs, buf.size)
            carry = pool[buf.perm[tail]] if buf.perm is not None else pool[tail].copy()
            pools.put(pool)

    def _buffer_keys(self, carry: np.ndarray, buf: _Buffer) -> np.ndarray:
        """Global token ids of a buffer in delivery order: the carried ones, then its blocks."""
        keys = np.concatenate([carry, *(self._blocks[i].keys() for i in buf.blocks)])
        return keys[buf.perm] if buf.perm is not None else keys

    def _shard_of(self, keys: np.ndarray) -> np.ndarray:
        """Shard index of each global token id."""
        return np.searchsorted(self._offsets, keys, side="right") - 1

    def _read_block(self, reader: BlockSource, block: _Block, out: np.ndarray) -> int:
        """Read and normalise ``block`` into the first rows of ``out``; returns its size.

        Piece by piece, so that normalising (or selecting) works on cache-warm data.
        """
        norm, pos = self.normalizer, 0
        for s, e, piece in reader.pieces(block.shard, block.start, block.stop):
            if block.rows is None:
                norm.apply_into(piece, out[s - block.start : e - block.start])
                continue
            end = int(np.searchsorted(block.rows, e - block.start))
            dest = out[pos:end]
            np.take(piece, block.rows[pos:end] - (s - block.start), axis=0, out=dest)
            norm.apply_(dest)
            pos = end
        return block.n

    def _fetch(self, reader: BlockSource, keys: np.ndarray) -> np.ndarray:
        """Normalised activations of the tokens with global ids ``keys`` (in that order)."""
        out = np.empty((len(keys), self.d_model), np.float32)
        shard_of = self._shard_of(keys)
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            local = keys[where] - self._offsets[k]
            order = np.argsort(local)
            out[where[order]] = reader.rows(int(k), local[order])
        return self.normalizer.apply_(out)

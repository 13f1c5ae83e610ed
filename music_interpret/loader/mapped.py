"""The mapped path of :class:`~music_interpret.loader.ActivationLoader`: every batch is one
gather from the store's memory-mapped rows (``StoreReader.map_shards``), on Linux from
all shards side by side in one address range (:func:`~music_interpret.rowmaps.join_maps`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..gather import Gatherer
from ..rowmaps import JoinedRows, MappedShard, NotMappable, join_maps, rows_tensor
from .threads import _BatchMemory, _Block, _Buffer

if TYPE_CHECKING:
    import torch

    from ..interfaces import StoreReader
    from ..normalize import Normalizer


class MappedPath:
    """Batches gathered from memory-mapped rows (mixed into the loader)."""

    info: StoreReader
    normalizer: Normalizer
    batch_size: int
    d_model: int
    _hook_index: int
    _blocks: list[_Block]
    _maps: list[tuple[MappedShard, torch.Tensor]] | None
    _joined: tuple[torch.Tensor | None, np.ndarray] | None
    _gather: Gatherer | None

    def _plan(self, epoch: int) -> Iterator[_Buffer]:
        raise NotImplementedError

    def _use_mmap(self, wanted: bool | None) -> bool:
        """Whether batches are gathered from memory-mapped shards (see the module doc)."""
        if wanted is False:
            return False
        try:
            self._map()
        except NotMappable as exc:
            if wanted:
                raise UserError(f"mmap: {exc}") from None
            return False
        return True

    def _map(self) -> list[tuple[MappedShard, torch.Tensor]]:
        """Every shard memory-mapped, with its rows as a (rows, d_model) tensor."""
        if self._maps is None:

            self._maps = [(m, rows_tensor(m.rows, m.dtype)) for m in self.info.map_shards()]
        return self._maps

    def _rows_space(self) -> tuple[torch.Tensor | None, np.ndarray]:
        """(all shards' rows as one tensor, or None where they cannot be joined; the
        first row of each shard in that tensor, or in a virtual one without gaps)."""
        if self._joined is None:

            maps = [m for m, _ in self._map()]
            try:
                joined: JoinedRows | None = join_maps(maps)
            except NotMappable:
                joined = None
            if joined is not None:
                self._joined = (rows_tensor(joined.rows, joined.dtype), joined.first)
            else:
                sizes = [m.rows.shape[0] for m in maps]
                self._joined = (None, np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64))
        return self._joined

    def _mapped_stage(self, epoch: int, skip: int, memory: _BatchMemory) -> Iterator[np.ndarray]:
        """The same batches as the pooled stages, each gathered from the mapped shards."""
        import torch

        bs = self.batch_size
        joined, _ = self._rows_space()
        gather = self._gatherer()
        carry, done = np.empty(0, np.int64), 0
        for buf in self._plan(epoch):
            rows = self._buffer_rows(carry, buf)
            carry = rows[buf.n_full * bs :]
            first = max(0, skip - done)
            done += buf.n_batches
            if first >= buf.n_batches:
                continue
            index = torch.from_numpy(rows)
            for b in range(first, buf.n_batches):
                out = memory.take(min(bs, len(rows) - b * bs))
                dest = torch.from_numpy(out)
                if joined is None:
                    self._gather_by_shard(rows[b * bs : (b + 1) * bs], dest)
                    self.normalizer.apply_tensor_(dest)
                else:
                    gather(joined, index[b * bs : b * bs + len(dest)], dest, *self.normalizer.float32)
                del dest
                yield out
                del out

    def _gatherer(self) -> Gatherer:
        """Gathers (and widens 16-bit) rows into batches, see :mod:`music_interpret.gather`."""
        if self._gather is None:
            self._gather = Gatherer(self.d_model, _torch_dtype(self.info.dtype))
        return self._gather

    def _buffer_rows(self, carry: np.ndarray, buf: _Buffer) -> np.ndarray:
        """Rows (of :meth:`_rows_space`) of a buffer's tokens in delivery order: the
        carried ones, then its blocks'."""
        maps, (_, first) = self._map(), self._rows_space()
        parts = [carry]
        for i in buf.blocks:
            block = self._blocks[i]
            rows = maps[block.shard][0].row_index(block.tokens(), self._hook_index)
            parts.append(first[block.shard] + rows)
        rows = np.concatenate(parts)
        return rows[buf.perm] if buf.perm is not None else rows

    def _gather_by_shard(self, rows: np.ndarray, dest: torch.Tensor) -> None:
        """Fill ``dest`` with ``rows`` of the virtual row space, one gather per shard."""
        import torch

        maps, (_, first) = self._map(), self._rows_space()
        shard = np.searchsorted(first, rows, side="right") - 1
        for k in np.unique(shard):
            at = np.flatnonzero(shard == k)
            part = torch.index_select(maps[int(k)][1], 0, torch.from_numpy(rows[at] - first[k]))
            dest.index_copy_(0, torch.from_numpy(at), part.to(dest.dtype))



def _torch_dtype(dtype: str) -> Any:
    """The torch dtype whose bit layout stored rows of ``dtype`` have."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]

"""The typed reader of the activation-store door: what :meth:`ActivationStore.open
<music_interpret.interfaces.ActivationStore.open>` returns (:class:`StoreReader`), what
``create`` returns (:class:`StoreWriter`), and the block reader of one hook point
(:class:`BlockSource`). Re-exported by :mod:`music_interpret.interfaces`.

Tokens are numbered over the whole store, shard after shard; shards hold whole songs.
Generic code (the loader, statistics, ``open_activations``, analyzers) reads stores only
through these members; the concrete helpers at the end of :class:`StoreReader` are
written against its abstract members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import xarray as xr

    from ..doors import EventVocabulary, ShardInfo
    from ..rowmaps import MappedShard


class StoreWriter(Protocol):
    """What ``ActivationStore.create`` returns: appends shards of whole songs."""

    @property
    def next_song(self) -> int:
        """First song not yet in a complete shard (where a resumed run continues)."""

    @property
    def n_shards(self) -> int:
        """Complete shards written."""

    @property
    def n_tokens(self) -> int:
        """Tokens in complete shards."""

    def write_shard(self, acts: np.ndarray, coords: Mapping[str, np.ndarray],
                    song_start: int, song_stop: int) -> Any:
        """Write ``acts`` (n_tokens, n_hooks, d_model) float32 and the token coordinates."""

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete."""


class BlockSource(Protocol):
    """Fast reads of one hook point's activations, as float32, shard by shard."""

    def pieces(self, shard: int, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Tokens [start, stop) of a shard as pieces ``(s, e, array)``."""

    def read(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a shard as a new (n, d_model) array."""

    def rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """The tokens ``rows`` (sorted, unique) of a shard."""

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> BlockSource: ...

    def __exit__(self, *exc: object) -> None: ...


class StoreReader(ABC):
    """Typed read access to one activation store (what ``ActivationStore.open`` returns)."""

    path: Path

    @property
    @abstractmethod
    def store_name(self) -> str:
        """Name of the store plugin that wrote (and reads) the store."""

    @property
    @abstractmethod
    def store_id(self) -> str:
        """Unique id of the store (statistics and dictionaries record it)."""

    @property
    @abstractmethod
    def hooks(self) -> list[str]:
        """The hook points stored."""

    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the stored activations."""

    @property
    @abstractmethod
    def dtype(self) -> str:
        """Stored precision (``float32``, ``float16``, ``bfloat16``); reads give float32."""

    @property
    @abstractmethod
    def n_tokens(self) -> int:
        """Tokens in the store."""

    @property
    @abstractmethod
    def attrs(self) -> dict[str, Any]:
        """What the writer recorded: model, checkpoint hash, dataset, split, events, ..."""

    @property
    def digest(self) -> str | None:
        """sha256 of what identifies the store's exact content (its manifest), if it has one."""
        return None

    @property
    def summary(self) -> dict[str, Any]:
        """What the writer recorded when it finished (counts, timings)."""
        return {}

    @property
    @abstractmethod
    def songs(self) -> list[str]:
        """The song table: song names (coordinate ``song`` indexes it)."""

    @property
    @abstractmethod
    def song_sources(self) -> list[str]:
        """Where each song of the table came from."""

    @property
    @abstractmethod
    def shard_table(self) -> list[ShardInfo]:
        """Every shard, in order."""

    @property
    @abstractmethod
    def vocabulary(self) -> EventVocabulary:
        """The event vocabulary of the adapter the activations came from."""

    @abstractmethod
    def hook_index(self, hook: str) -> int:
        """Position of ``hook`` among :attr:`hooks`; ``UserError`` naming the stored ones."""

    @abstractmethod
    def read_coords(self, shard: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Token coordinates of a shard (every stored one unless ``names`` is given)."""

    @abstractmethod
    def blocks(self, hook: str, lock: Any = None) -> BlockSource:
        """A reader of ``hook``'s activations (a context manager; close it)."""

    @abstractmethod
    def open_dataset(self, hooks: Sequence[str] | None = None, *, lazy: bool | None = None,
                     parallel: bool = False, chunk_tokens: int | None = None,
                     load_coords: bool = True) -> xr.Dataset:
        """The whole store as one ``xarray.Dataset`` (see :func:`~music_interpret.open_activations`)."""

    @abstractmethod
    def writer_options(self) -> dict[str, Any]:
        """Options of the store plugin's ``Config`` that write a store laid out like this one."""

    def map_shards(self) -> list[MappedShard]:
        """Every shard's activation rows memory-mapped (zero-copy training batches); raises
        :class:`~music_interpret.rowmaps.NotMappable` where the store cannot."""
        from ..rowmaps import NotMappable

        raise NotMappable(f"{self.path}: the {self.store_name} store offers no memory maps")

    # -- helpers written against the members above ----------------------------------

    def read_block(self, shard: int, hook: str, start: int, stop: int) -> np.ndarray:
        """Activations (stop - start, d_model) float32 of tokens [start, stop) of a shard."""
        with self.blocks(hook) as reader:
            return reader.read(shard, start, stop)

    def iter_blocks(self, hook: str, block_tokens: int, max_tokens: int | None = None,
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(store offset, activations)`` blocks in store order, up to ``max_tokens``."""
        limit = self.n_tokens if max_tokens is None else max_tokens
        with self.blocks(hook) as reader:
            for shard in self.shard_table:
                n = min(shard.tokens, limit - shard.token_start)
                for start in range(0, max(n, 0), block_tokens):
                    yield shard.token_start + start, reader.read(shard.index, start,
                                                                 min(n, start + block_tokens))
                if shard.token_start + shard.tokens >= limit:
                    return

    def iter_coords(self, names: Sequence[str], max_tokens: int | None = None,
                    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """``(shard, tokens used, coordinates of the whole shard)`` in store order, stopping
        after ``max_tokens`` tokens."""
        left = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        for shard in self.shard_table:
            if left <= 0:
                return
            yield shard.index, min(left, shard.tokens), self.read_coords(shard.index, names)
            left -= shard.tokens

    def gather_coords(self, tokens: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Coordinates of the store tokens ``tokens`` (any shape; -1 stays -1), int32."""
        import numpy as np

        out = {k: np.full(tokens.shape, -1, np.int32) for k in names}
        for shard in self.shard_table:
            here = (tokens >= shard.token_start) & (tokens < shard.token_start + shard.tokens)
            if here.any():
                coords = self.read_coords(shard.index, names)
                for k in names:
                    out[k][here] = coords[k][tokens[here] - shard.token_start]
        return out

    def read_rows(self, hook: str, index: np.ndarray, chunk: int = 16_384) -> np.ndarray:
        """Activations (n, d_model) float32 of the store tokens ``index`` (sorted)."""
        import numpy as np

        out = np.empty((len(index), self.d_model), np.float32)
        with self.blocks(hook) as reader:
            for shard in self.shard_table:
                offset = shard.token_start
                for s in range(0, shard.tokens, chunk):
                    e = min(shard.tokens, s + chunk)
                    a, b = np.searchsorted(index, [offset + s, offset + e])
                    if a < b:
                        out[a:b] = reader.read(shard.index, s, e)[index[a:b] - offset - s]
        return out

    def statistics(self, stats: Any = None) -> xr.Dataset:
        """The preprocess statistics of this store (``<store>/stats/stats.nc`` unless
        ``stats`` names a file, folder or Dataset); ``UserError`` when missing or when they
        belong to another store."""
        from ..stats import check_stats_for, load_stats

        ds = load_stats(self.path / "stats" if stats is None else stats)
        check_stats_for(ds, self)
        return ds

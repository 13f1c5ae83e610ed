"""Training loader: shuffled, optionally filtered and normalised batches from a store.

Block shuffling: the token ranges of every shard are cut into blocks of
``block_tokens`` tokens; each epoch permutes the block list with a seeded
``numpy.random.Generator``, reads ``buffer_blocks`` blocks at a time (contiguous
reads), puts the tokens carried over from the previous buffer in front, permutes
the pool with the same generator and cuts it into batches; the tokens that do not
fill a batch carry into the next buffer. With ``shuffle_run`` r > 1 the pool is
permuted in runs of r consecutive tokens (a batch then holds batch_size / r runs of
neighbouring tokens): the gathers copy whole runs of rows, which is faster (about
1.7-1.9x at r = 16 on the benchmark machine, see ``bench/README.md``), at the cost of
correlated neighbours inside a batch. The final partial batch of an epoch is
delivered unless ``drop_last``. Every selected token is delivered exactly once per
epoch, and the batch sequence depends only on (seed, epoch), down to the order of
the tokens inside each batch.

Two ways to deliver the same batches (bitwise):

* **mapped** (default whenever the shards can be mapped: uncompressed activations
  whose chunks lie in order, as the ``netcdf`` store writes them in either layout):
  each shard's activations are memory-mapped (:mod:`music_interpret.stores.mapped`),
  on Linux all of them side by side in one address range, and every batch is one
  gather of its rows straight from the page cache into the batch tensor
  (:mod:`music_interpret.gather`: a small thread pool, no OpenMP barrier; 16-bit
  stores are widened to float32 on the way): no read buffers, and the memory in use is
  the batches in flight (the OS keeps the hot part of the files cached, as for any
  file read). Elsewhere each batch takes one gather per shard it draws from.
* **pooled** (stores that cannot be mapped, e.g. compressed, or ``mmap=False``): blocks are read
  through h5py into read buffers (decoded to float32), then permuted into batches (below).

Because block sizes and permutations are known without reading data, the loader
resumes mid-epoch (:meth:`ActivationLoader.state_dict`) by replaying the index
bookkeeping only and reading the few carried-over tokens directly.

With ``prefetch`` > 0 the mapped path gathers batches in a background thread,
``prefetch`` batches ahead. By default (``prefetch=None``) it does so for a CUDA target,
whose compute the gathers then overlap; for a CPU target it gathers in the consumer's
thread, because the gather already uses every core (a second thread would only
compete with the training step for them and costs about a third of the loader's
throughput in hand-offs). In the pooled path (``prefetch=None``: 2) two background threads work ahead of
the consumer: one reads
and normalises buffers (reads in chunk-aligned pieces, normalised while cache-warm),
the other permutes them into batches (``prefetch`` batches queued), so reading and
batching overlap. They use two read buffers of about
``(buffer_blocks x block_tokens + batch_size) x d_model x 4`` bytes each (about 1 GiB
together at the defaults with d_model 512), kept between iterations; ``close()``
frees them. Every HDF5 read holds xarray's HDF5 lock (which xarray and dask reads take
too). Batches are float32 whatever the stored precision (float32, float16, bfloat16).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError
from .gather import Gatherer
from .preprocess import MODES, BlockReader, Normalizer, check_stats_for, load_stats, reader_for
from .stores import schema
from .stores.mapped import JoinedRows, MappedShard, NotMappable, join_maps, map_store
from .stores.netcdf import EVENT_TYPES, NC_LOCK, TOKEN_COORDS, check_store, read_coords

if TYPE_CHECKING:
    import torch
    import xarray as xr

FilterValue = int | str | Sequence[int | str]


def _io_lock() -> Any:
    """The package-wide HDF5 lock (shared with xarray's reads)."""
    return NC_LOCK


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


class ActivationLoader:
    """Batches ``(batch, d_model)`` of one hook point's activations, shuffled by blocks.

    ``normalization`` is ``none``, ``standardize`` or ``unit_mean_norm`` (needs
    ``stats``: ``stats.nc``, its folder, or a loaded Dataset). ``filters`` maps a token
    coordinate to a value or list of values (event types also by name, e.g.
    ``{"event_type": "note"}``). ``epochs`` is the number of epochs one iteration
    runs, starting at the current state (None: endless). ``mmap`` picks the mapped
    path (True: required, an error if the store cannot be mapped), the pooled path
    (False), or the mapped one when possible (None). Iterate from one place at a
    time; the loader's state advances as batches are delivered.
    """

    def __init__(
        self,
        store_path: str | Path,
        hook: str,
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        seed: int = 0,
        normalization: str = "none",
        stats: str | Path | xr.Dataset | None = None,
        filters: Mapping[str, FilterValue] | None = None,
        block_tokens: int = 65_536,
        buffer_blocks: int = 4,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        prefetch: int | None = None,
        dtype: torch.dtype | None = None,
        epochs: int | None = 1,
        mmap: bool | None = None,
        shuffle_run: int = 1,
    ) -> None:
        import torch

        for name, value in (("batch_size", batch_size), ("block_tokens", block_tokens),
                            ("buffer_blocks", buffer_blocks), ("shuffle_run", shuffle_run)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if prefetch is not None and prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be positive or None (endless), got {epochs}")
        self.info = check_store(store_path)
        self.hook = hook
        self._hook_index = self.info.hook_index(hook)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.shuffle_run = int(shuffle_run)
        self.seed = int(seed)
        self.block_tokens = int(block_tokens)
        self.buffer_blocks = int(buffer_blocks)
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.dtype = dtype or torch.float32
        self.epochs = epochs
        self.filters = dict(filters or {})
        self.normalizer = self._normalizer(normalization, stats)
        self._offsets = np.concatenate([[0], np.cumsum([s["tokens"] for s in self.info.manifest["shards"]])])
        self._blocks = self._plan_blocks(self._selections())
        self._counts = np.asarray([b.n for b in self._blocks], np.int64)
        self.n_tokens = int(self._counts.sum())
        if self.n_tokens == 0:
            raise UserError(f"{self.info.path}: filters {self.filters} select no tokens")
        if len(self) == 0:
            raise UserError(f"{self.info.path}: {self.n_tokens} selected tokens are fewer than "
                            f"batch_size {self.batch_size} with drop_last")
        self._epoch = 0
        self._position = 0
        self._lock = _io_lock()
        self._active: set[_Prefetcher] = set()
        self._spare: list[np.ndarray] = []  # read buffers kept for the next iteration
        self._maps: list[tuple[MappedShard, torch.Tensor]] | None = None  # per shard: map, rows
        self._joined: tuple[torch.Tensor | None, np.ndarray] | None = None  # see _rows_space
        self._gather: Gatherer | None = None
        self.mapped = self._use_mmap(mmap)
        if prefetch is None:
            prefetch = 0 if self.mapped and self.device.type == "cpu" else 2
        self.prefetch = int(prefetch)

    # -- set-up -----------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        return self.info.d_model

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.n_tokens, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

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

            self._maps = [(m, rows_tensor(m.rows, m.dtype)) for m in map_store(self.info)]
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

    def _normalizer(self, mode: str, stats: Any) -> Normalizer:
        if mode not in MODES:
            raise UserError(f"normalization: {mode!r} is not a mode ({', '.join(MODES)})")
        if stats is None:
            if mode != "none":
                raise UserError(f"normalization {mode!r} needs statistics: pass stats= "
                                f"(e.g. {self.info.path / 'stats' / 'stats.nc'}, "
                                "written by the preprocess stage)")
            return Normalizer.identity(self.info.d_model, self.hook)
        ds = load_stats(stats)
        check_stats_for(ds, self.info)
        return Normalizer.from_stats(ds, self.hook, mode)

    def _selections(self) -> list[np.ndarray | None]:
        """Per shard: the selected token indices (None: all tokens)."""
        if not self.filters:
            return [None] * len(self.info.shards)
        unknown = [k for k in self.filters if k not in TOKEN_COORDS]
        if unknown:
            raise UserError(f"filters: unknown coordinate(s) {', '.join(map(repr, unknown))} "
                            f"(known: {', '.join(TOKEN_COORDS)})")
        wanted = {k: self._filter_values(k, v) for k, v in self.filters.items()}
        out: list[np.ndarray | None] = []
        for shard in self.info.shards:
            coords = read_coords(shard, list(wanted))
            mask = np.ones(len(next(iter(coords.values()))), bool)
            for name, values in wanted.items():
                mask &= np.isin(coords[name], values)
            out.append(np.flatnonzero(mask))
        return out

    @staticmethod
    def _filter_values(name: str, value: FilterValue) -> np.ndarray:
        values = [value] if isinstance(value, (int, str, np.integer)) else list(value)
        out = []
        for v in values:
            if name == "event_type" and isinstance(v, str):
                key = v.replace("_", "-")
                if key not in EVENT_TYPES:
                    raise UserError(f"filters.event_type: {v!r} is not an event type "
                                    f"(known: {', '.join(EVENT_TYPES)})")
                v = EVENT_TYPES.index(key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise UserError(f"filters.{name}: expected an integer or a list of integers, got {v!r}")
            out.append(int(v))
        return np.asarray(out, np.int64)

    def _plan_blocks(self, selections: list[np.ndarray | None]) -> list[_Block]:
        blocks = []
        for k, entry in enumerate(self.info.manifest["shards"]):
            n, sel, key0 = int(entry["tokens"]), selections[k], int(self._offsets[k])
            for start in range(0, n, self.block_tokens):
                stop = min(start + self.block_tokens, n)
                if sel is None:
                    blocks.append(_Block(k, start, stop, None, key0 + start))
                    continue
                rows = sel[np.searchsorted(sel, start):np.searchsorted(sel, stop)]
                if not len(rows):
                    continue
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                rel = None if len(rows) == hi - lo else (rows - lo).astype(np.int32)
                blocks.append(_Block(k, lo, hi, rel, key0 + lo))
        return blocks

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: the epoch and the batches of it already delivered."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "n_tokens": self.n_tokens,
                "shuffle_run": self.shuffle_run}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state``: the next iteration yields the remaining batches."""
        saved = {"shuffle_run": 1, **state}  # states saved before shuffle_run existed: 1
        for key in ("seed", "batch_size", "n_tokens", "shuffle_run"):
            if key in saved and int(saved[key]) != getattr(self, key):
                raise ValueError(f"loader state has {key}={saved[key]}, this loader {getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"invalid loader state {dict(state)}")
        if position >= len(self):
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position

    # -- epoch plan (indices only, no data) ---------------------------------------------

    def _plan(self, epoch: int) -> Iterator[_Buffer]:
        rng = np.random.default_rng([self.seed, epoch])
        nb = len(self._blocks)
        order = rng.permutation(nb) if self.shuffle else np.arange(nb)
        bs = self.batch_size
        carry = 0
        for g in range(0, nb, self.buffer_blocks):
            ids = order[g : g + self.buffer_blocks]
            size = carry + int(self._counts[ids].sum())
            perm = self._permutation(rng, size) if self.shuffle else None
            n_full = size // bs
            last = g + self.buffer_blocks >= nb
            extra = 1 if last and size % bs and not self.drop_last else 0
            yield _Buffer(ids, perm, size, n_full, n_full + extra)
            carry = size - n_full * bs

    def _permutation(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A permutation of ``size`` pool positions, in runs of ``shuffle_run``."""
        r = self.shuffle_run
        if r == 1:
            return rng.permutation(size)
        runs = rng.permutation(-(-size // r))
        perm = (runs[:, None] * r + np.arange(r)).ravel()
        return perm[perm < size] if size % r else perm

    def _pool_rows(self) -> int:
        """Rows of a read buffer: the largest carry plus the largest ``buffer_blocks`` blocks."""
        top = np.sort(self._counts)[::-1][: self.buffer_blocks].sum()
        return int(min(self.n_tokens, self.batch_size - 1 + top))

    # -- the two stages: read buffers, cut batches ------------------------------------------

    def _read_stage(self, epoch: int, skip: int, pools: _Pools,
                    halt: threading.Event) -> Iterator[_Filled]:
        """Read (and normalise) the new blocks of each buffer into a pool, from batch ``skip`` on.

        Buffers whose batches were all delivered before ``skip`` are replayed on indices
        only; the carried tokens of the first buffer read are then fetched directly.
        """
        bs = self.batch_size
        carry_keys = np.empty(0, np.int64)
        done, fetch_carry = 0, skip > 0
        reader = reader_for(self.info, self.hook, lock=self._lock)
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
            self._gather = Gatherer(self.d_model, schema.torch_dtype(self.info.dtype))
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

    def _buffer_keys(self, carry: np.ndarray, buf: _Buffer) -> np.ndarray:
        """Global token ids of a buffer in delivery order: the carried ones, then its blocks."""
        keys = np.concatenate([carry, *(self._blocks[i].keys() for i in buf.blocks)])
        return keys[buf.perm] if buf.perm is not None else keys

    def _shard_of(self, keys: np.ndarray) -> np.ndarray:
        """Shard index of each global token id."""
        return np.searchsorted(self._offsets, keys, side="right") - 1

    def _read_block(self, reader: BlockReader, block: _Block, out: np.ndarray) -> int:
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

    def _fetch(self, reader: BlockReader, keys: np.ndarray) -> np.ndarray:
        """Normalised activations of the tokens with global ids ``keys`` (in that order)."""
        out = np.empty((len(keys), self.d_model), np.float32)
        shard_of = self._shard_of(keys)
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            local = keys[where] - self._offsets[k]
            order = np.argsort(local)
            out[where[order]] = reader.rows(int(k), local[order])
        return self.normalizer.apply_(out)

    # -- iteration ----------------------------------------------------------------------

    def _tensors(self, epoch: int, position: int, stop: threading.Event) -> Iterator[torch.Tensor]:
        """Batches as tensors from (epoch, position) on; reading runs in its own thread."""
        import torch

        pin = self.pin_memory and torch.cuda.is_available()
        threaded = self.prefetch > 0
        pools = None if self.mapped else _Pools(2 if threaded else 1, self._pool_rows(),
                                                self.d_model, self._spare)
        memory = _BatchMemory(self.batch_size, self.d_model, self.prefetch + 4)
        self._spare = []
        count = 0
        try:
            while (self.epochs is None or count < self.epochs) and not stop.is_set():
                halt = threading.Event()  # ends this epoch's reader thread
                filled: Any = None
                if pools is None:
                    batches = self._mapped_stage(epoch, position, memory)
                else:
                    filled = self._read_stage(epoch, position, pools, halt)
                    if threaded:
                        filled = _Prefetcher(filled, 1, halt)
                    batches = self._batch_stage(filled, pools, memory)
                try:
                    for arr in batches:
                        t = torch.from_numpy(arr)
                        del arr  # the tensor alone keeps the batch's memory in use
                        if t.dtype != self.dtype:
                            t = t.to(self.dtype)
                        yield t.pin_memory() if pin else t
                        del t
                finally:
                    batches.close()
                    if filled is not None:
                        filled.close()
                epoch, position, count = epoch + 1, 0, count + 1
        finally:
            if pools is not None:
                self._spare = pools.arrays  # the next iteration reuses the buffers

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._iterate()

    def _iterate(self) -> Iterator[torch.Tensor]:
        stop = threading.Event()
        source = self._tensors(self._epoch, self._position, stop)
        if self.prefetch:
            source = _Prefetcher(source, self.prefetch, stop)
            self._active.add(source)
        try:
            n = len(self)
            for t in source:
                self._position += 1
                if self._position >= n:
                    self._epoch, self._position = self._epoch + 1, 0
                yield t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)
        finally:
            source.close()
            self._active.discard(source)

    def close(self) -> None:
        """Stop the background threads of running iterations and free the read buffers."""
        for prefetcher in list(self._active):
            prefetcher.close()
        self._active.clear()
        self._spare = []
        self._maps = self._joined = None
        if self._gather is not None:
            self._gather.close()
            self._gather = None

    def __repr__(self) -> str:
        return (f"ActivationLoader({str(self.info.path)!r}, {self.hook!r}, batch_size={self.batch_size}, "
                f"n_tokens={self.n_tokens}, normalization={self.normalizer.mode!r}, "
                f"filters={self.filters}, shuffle={self.shuffle}, shuffle_run={self.shuffle_run}, "
                f"seed={self.seed}, "
                f"mapped={self.mapped})")


@dataclass(frozen=True)
class _Filled:
    """A pool holding a buffer's new tokens after ``carry_len`` rows (and the carry, if fetched)."""

    buffer: _Buffer
    pool: np.ndarray
    carry_len: int
    first_batch: int
    has_carry: bool


def rows_tensor(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Mapped rows as a tensor of the stored precision (16-bit bit patterns viewed as such)."""
    import torch

    if dtype == "float32":
        return torch.from_numpy(rows)
    return torch.from_numpy(rows.view(np.int16)).view(schema.torch_dtype(dtype))


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

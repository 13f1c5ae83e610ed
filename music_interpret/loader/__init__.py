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

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..doors import STORE_COORDINATES
from ..errors import UserError
from ..gather import Gatherer
from ..normalize import MODES, Normalizer
from ..rowmaps import MappedShard, rows_tensor  # noqa: F401 - re-exported
from ..stats import check_stats_for, load_stats
from .mapped import MappedPath
from .pooled import PooledPath
from .threads import _BatchMemory, _Block, _Buffer, _Pools, _Prefetcher

if TYPE_CHECKING:
    import torch
    import xarray as xr

    from ..interfaces import StoreReader

__all__ = ["ActivationLoader", "FilterValue", "rows_tensor"]

FilterValue = int | str | Sequence[int | str]


class ActivationLoader(MappedPath, PooledPath):
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
        self.info: StoreReader = _open(store_path)
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
        self._offsets = np.asarray([*(s.token_start for s in self.info.shard_table),
                                    self.info.n_tokens], np.int64)
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
        self._lock = None  # the store's own lock
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
            return [None] * len(self.info.shard_table)
        unknown = [k for k in self.filters if k not in STORE_COORDINATES]
        if unknown:
            raise UserError(f"filters: unknown coordinate(s) {', '.join(map(repr, unknown))} "
                            f"(known: {', '.join(STORE_COORDINATES)})")
        wanted = {k: self._filter_values(k, v) for k, v in self.filters.items()}
        out: list[np.ndarray | None] = []
        for shard in self.info.shard_table:
            coords = self.info.read_coords(shard.index, list(wanted))
            mask = np.ones(len(next(iter(coords.values()))), bool)
            for name, values in wanted.items():
                mask &= np.isin(coords[name], values)
            out.append(np.flatnonzero(mask))
        return out

    def _filter_values(self, name: str, value: FilterValue) -> np.ndarray:
        """Codes a filter selects; event types also by name, in the store's vocabulary."""
        values = [value] if isinstance(value, (int, str, np.integer)) else list(value)
        out = []
        for v in values:
            if name == "event_type" and isinstance(v, str):
                events = self.info.vocabulary.events
                try:
                    v = self.info.vocabulary.event_code(v)
                except KeyError:
                    raise UserError(f"filters.event_type: {v!r} is not an event type "
                                    f"(known: {', '.join(events)})") from None
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise UserError(f"filters.{name}: expected an integer or a list of integers, got {v!r}")
            out.append(int(v))
        return np.asarray(out, np.int64)

    def _plan_blocks(self, selections: list[np.ndarray | None]) -> list[_Block]:
        blocks = []
        for shard in self.info.shard_table:
            k = shard.index
            n, sel, key0 = shard.tokens, selections[k], int(self._offsets[k])
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




def _open(store: str | Path | StoreReader) -> StoreReader:
    """The store at a path (through its plugin), or an opened reader as it is."""
    from ..stores import open_store

    return open_store(store) if isinstance(store, (str, Path)) else store

"""Planning of the ``extract`` stage: songs read, tokenized and windowed, then cut into shards.

Each song becomes a :class:`SongPlan` (its windows, the rows each window keeps and the
song's stored tokens with their coordinates); :func:`assemble` puts the plans of a
shard's songs together. :class:`SongPlanner` yields the plans of a list of songs in
order, computed in this thread or, with ``workers`` > 0, on worker processes that each
load the model adapter once (``spawn``) and plan chunks of songs ahead of the forward
passes. On a GPU the forward outruns one planning thread by far; this keeps it fed.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..doors import COORDINATES

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter, SongDataset, Window

CHUNK_SONGS = 32  # songs per task of a planning worker


@dataclass
class SongPlan:
    """One song, ready for the forward passes."""

    song: int  # index in the stage's song list
    n_tokens: int  # stored tokens (all, or notes only)
    windows: list[tuple[int, Window, np.ndarray, np.ndarray]]  # (window index, window, rows kept, song-local destination)
    coords: dict[str, np.ndarray]  # of the stored tokens, in song order
    dropped: int  # notes the tokenization could not represent


@dataclass
class ShardPlan:
    """The songs of one shard: windows to run and where each kept row goes."""

    songs: list[int]
    windows: list[tuple[int, int, Window]]  # (song, window index, window)
    coords: dict[str, np.ndarray]
    offsets: list[np.ndarray]  # per window: destination rows of its kept tokens
    keep: list[np.ndarray]  # per window: input positions kept
    n_tokens: int
    index: int | None = None  # under torchrun: the shard's place in the store
    token_start: int | None = None


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a store: its place, its songs and its first token."""

    index: int
    song_start: int
    song_stop: int
    token_start: int
    tokens: int


def cut_shards(counts: Sequence[int], shard_tokens: int) -> list[ShardSpec]:
    """The shards one process writes for songs of ``counts`` stored tokens: each takes
    songs until it holds ``shard_tokens`` tokens (at least one song)."""
    out: list[ShardSpec] = []
    song, token = 0, 0
    while song < len(counts):
        first, total = song, 0
        while song < len(counts) and (total < shard_tokens or song == first):
            total += counts[song]
            song += 1
        out.append(ShardSpec(len(out), first, song, token, total))
        token += total
    return out


def stored_mask(tokens: Any, notes_only: bool, note: int) -> np.ndarray:
    """Which tokens of a song the store keeps."""
    return tokens.coords["event_type"] == note if notes_only else np.ones(len(tokens), bool)


def count_song(adapter: ModelAdapter, dataset: SongDataset, name: str, notes_only: bool,
               note: int) -> int:
    """How many tokens of one song the store keeps."""
    return int(stored_mask(adapter.tokenize(dataset.read(name)), notes_only, note).sum())


def plan_song(adapter: ModelAdapter, dataset: SongDataset, name: str, song: int,
              notes_only: bool, note: int, stride: int | None) -> SongPlan:
    """Read, tokenize and window one song (no forward pass)."""
    tokens = adapter.tokenize(dataset.read(name))
    wins = adapter.song_windows(tokens, stride)
    n = len(tokens)
    chosen = stored_mask(tokens, notes_only, note)
    dest = np.cumsum(chosen) - 1  # row of each stored token among the song's stored tokens
    seq_pos = np.zeros(n, np.int64)
    window_of = np.zeros(n, np.int64)
    windows = []
    for w_index, win in enumerate(wins):
        rows = np.flatnonzero(win.owned & chosen[win.token]) if notes_only else np.flatnonzero(win.owned)
        song_rows = win.token[rows]
        seq_pos[song_rows] = rows
        window_of[song_rows] = w_index
        if len(rows):
            windows.append((w_index, win, rows, dest[song_rows]))
    sel = np.flatnonzero(chosen) if notes_only else np.arange(n)
    coords = {"song": np.full(len(sel), song), "seq_pos": seq_pos[sel], "song_token": sel,
              "window": window_of[sel], **{k: np.asarray(tokens.coords[k])[sel] for k in COORDINATES}}
    return SongPlan(song, len(sel), windows, coords, int(tokens.dropped))


def assemble(plans: Sequence[SongPlan]) -> ShardPlan:
    """One shard from the plans of its songs (in order)."""
    windows, offsets, keeps = [], [], []
    total = 0
    for p in plans:
        for w_index, win, rows, dest in p.windows:
            windows.append((p.song, w_index, win))
            offsets.append(dest + total)
            keeps.append(rows)
        total += p.n_tokens
    coords = {k: np.concatenate([p.coords[k] for p in plans]) for k in plans[0].coords}
    return ShardPlan([p.song for p in plans], windows, coords, offsets, keeps, total)


class SongPlanner:
    """The plans of ``songs`` (indices into ``names``), in order.

    ``workers`` 0 plans in the calling thread; more start that many ``spawn`` processes,
    each building the adapter (``adapter_ref``, loaded from ``model_path`` on CPU) and
    opening the dataset once, and keeps about two chunks per worker in flight.
    """

    def __init__(self, adapter: ModelAdapter, dataset: SongDataset, names: list[str], *,
                 notes_only: bool, note: int, stride: int | None, workers: int = 0,
                 adapter_ref: Any = None, model_path: Path | None = None,
                 data: tuple[Path, str | None] | None = None) -> None:
        self.adapter, self.dataset, self.names = adapter, dataset, names
        self.args = (notes_only, note, stride)
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self.pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(adapter_ref, model_path, data, names, self.args))
        self.ahead = 2 * workers

    def plans(self, songs: Sequence[int]) -> Iterator[SongPlan]:
        """The plans of ``songs``, in the order given."""
        if self.pool is None:
            for song in songs:
                yield plan_song(self.adapter, self.dataset, self.names[song], song, *self.args)
            return
        chunks = (list(songs[i: i + CHUNK_SONGS]) for i in range(0, len(songs), CHUNK_SONGS))
        queue: deque[Future[list[SongPlan]]] = deque()
        for chunk in chunks:
            queue.append(self.pool.submit(_plan_chunk, chunk))
            if len(queue) > self.ahead:
                yield from queue.popleft().result()
        while queue:
            yield from queue.popleft().result()

    def counts(self, songs: Sequence[int]) -> list[int]:
        """Stored tokens of each of ``songs`` (tokenized, not windowed), on the workers when
        there are any."""
        if self.pool is None:
            return [count_song(self.adapter, self.dataset, self.names[s], *self.args[:2]) for s in songs]
        chunks = [list(songs[i: i + CHUNK_SONGS]) for i in range(0, len(songs), CHUNK_SONGS)]
        futures = [self.pool.submit(_count_chunk, chunk) for chunk in chunks]
        return [n for future in futures for n in future.result()]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def default_plan_workers(device: str) -> int:
    """Planning processes when the config leaves it open: none on CPU (the forward passes
    need the cores), beside a GPU half the usable CPUs (at most 8), shared out between the
    ranks ``torchrun`` started on this machine."""
    if not device.startswith("cuda"):
        return 0
    from ..resources import usable_cpus

    cpus = usable_cpus()
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cpus // 2 // ranks_here))


_worker: dict[str, Any] = {}


def _init_worker(adapter_ref: Any, model_path: Path, data: tuple[Path, str | None],
                 names: list[str], args: tuple[bool, int, int | None]) -> None:
    import signal

    import torch

    from ..plugins import get_registry

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    torch.set_num_threads(1)
    adapter = adapter_ref.build(get_registry())
    adapter.load(model_path, device="cpu")
    _worker.update(adapter=adapter, dataset=adapter.open_dataset(*data), names=names, args=args)


def _count_chunk(songs: list[int]) -> list[int]:
    w = _worker
    return [count_song(w["adapter"], w["dataset"], w["names"][s], *w["args"][:2]) for s in songs]


def _plan_chunk(songs: list[int]) -> list[SongPlan]:
    w = _worker
    return [plan_song(w["adapter"], w["dataset"], w["names"][s], s, *w["args"]) for s in songs]


def take_shard(songs: Iterator[SongPlan], stats: dict[str, Any], *, shard_tokens: int | None = None,
                stop: int | None = None) -> ShardPlan | None:
    """The next shard from the song plans: up to song ``stop`` (exclusive) when given, else
    songs until it holds ``shard_tokens`` tokens (the rule of :func:`cut_shards`)."""
    plans: list[SongPlan] = []
    total = 0
    while not plans or (plans[-1].song + 1 < stop if stop is not None else total < (shard_tokens or 0)):
        plan = next(songs, None)
        if plan is None:
            break
        plans.append(plan)
        total += plan.n_tokens
        stats["dropped_notes"] += plan.dropped
    return assemble(plans) if plans else None


def length_batches(lengths: list[int], batch_size: int, slack: float | None) -> list[slice]:
    """Cut windows sorted by decreasing length into batches (slices of the list).

    The token budget is ``batch_size`` times the longest length; a batch starting at
    length L takes the next windows while they fit the budget at length L and are at
    least ``(1 - slack) * L`` long. ``slack=None``: fixed batches of ``batch_size``.
    """
    if slack is None:
        return [slice(b, b + batch_size) for b in range(0, len(lengths), batch_size)]
    budget = batch_size * (lengths[0] if lengths else 0)
    out, i = [], 0
    while i < len(lengths):
        longest, j = lengths[i], i + 1
        while j < len(lengths) and (j - i + 1) * longest <= budget and lengths[j] >= (1 - slack) * longest:
            j += 1
        out.append(slice(i, j))
        i = j
    return out


def shard_batches(plan: ShardPlan, batch_size: int, slack: float | None) -> list[list[int]]:
    """Window indices of each forward batch of a shard, longest windows first."""
    lengths = [len(w[2].inputs) for w in plan.windows]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s] for s in length_batches([lengths[i] for i in order], batch_size, slack)]

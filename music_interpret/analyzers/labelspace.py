"""The labels of an analysis: which tokens take part, which ``attribute=value`` labels are
kept, and every selected token's label per attribute, computed once per store.

Tokens: ``notes`` (default: note tokens only; the header and end-of-song tokens, identical
in every song, would otherwise make trivial labels) or ``all``. A label is kept when at
least ``min_count`` selected tokens have it and at least ``min_count`` do not. The
attribute codes of the selected tokens are computed in one pass (music-theory labels need
whole songs; shards hold whole songs) and kept in a temporary folder, so that the
analysis passes only map them to label indices.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .attributes import ATTRIBUTES, SONG_KEY, attributes_for, iter_store_attributes

if TYPE_CHECKING:
    from ..interfaces import StoreReader

TOKENS = ("notes", "all")


@dataclass
class Chunk:
    """Selected tokens ``rows`` (indices inside shard ``shard``) and their label index per
    attribute (-1: none kept); ``shifted``: the same for each null shift; ``songs``: each
    token's song index (None when not asked for)."""

    shard: int
    rows: np.ndarray
    labels: np.ndarray
    shifted: list[np.ndarray] = field(default_factory=list)
    songs: np.ndarray | None = None


@dataclass
class LabelSpace:
    """The ``attribute=value`` labels kept for a selection of tokens, and their counts."""

    attributes: list[str]
    attribute: list[str]
    value: list[str]
    codes: list[int]
    counts: np.ndarray  # tokens per label
    n_tokens: int
    index: dict[str, np.ndarray]  # attribute -> code -> label index (-1: not kept)
    tokens: str = "all"
    selections: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (shard, rows)
    _dir: Any = None  # TemporaryDirectory holding the codes of every shard

    @property
    def names(self) -> list[str]:
        return [f"{a}={v}" for a, v in zip(self.attribute, self.value, strict=True)]

    @property
    def when(self) -> list[str]:
        """``t`` or ``t+1`` for every label."""
        return [ATTRIBUTES[a].when for a in self.attribute]

    def __len__(self) -> int:
        return len(self.codes)

    def matrix(self, codes: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n, attributes) label index of each token per attribute (-1: no kept label)."""
        cols = []
        for name in self.attributes:
            c = np.asarray(codes[name]).astype(np.int64)
            table = self.index[name]
            cols.append(np.where(c >= 0, table[np.maximum(c, 0)], -1))
        return np.stack(cols, axis=1) if cols else np.zeros((0, 0), np.int64)

    # -- building ---------------------------------------------------------------------

    @classmethod
    def scan(cls, info: StoreReader, attributes: Sequence[str], max_tokens: int | None, min_count: int,
             tokens: str = "all", meters: Mapping[int, Any] | None = None) -> LabelSpace:
        """Compute the attribute codes of the selected tokens (kept on disk), count every
        value and keep the labels on at least ``min_count`` tokens and off as many."""
        attributes = list(attributes)
        store = tempfile.TemporaryDirectory(prefix="mi-labels-")
        bound = attributes_for(info.vocabulary)
        totals = {a: np.zeros(len(bound[a].labels), np.int64) for a in attributes}
        n, selections = 0, []
        needed = list(dict.fromkeys([*attributes, "event_type"]))
        for shard, used, codes in iter_store_attributes(info, needed, max_tokens, meters):
            etype = codes["event_type"]
            rows = np.flatnonzero(etype == info.vocabulary.note) if tokens == "notes" \
                else np.arange(used)
            matrix = np.stack([codes[a][rows] for a in attributes], axis=1).astype(np.int16) \
                if attributes else np.zeros((len(rows), 0), np.int16)
            np.save(Path(store.name) / f"{shard}.npy", matrix)
            np.save(Path(store.name) / f"{shard}.song.npy", codes[SONG_KEY][rows])
            selections.append((shard, rows))
            n += len(rows)
            for j, a in enumerate(attributes):
                c = matrix[:, j]
                totals[a] += np.bincount(c[c >= 0], minlength=len(totals[a]))
        attribute, value, kept, counts, index = [], [], [], [], {}
        for a in attributes:
            table = np.full(len(totals[a]), -1, np.int64)
            for code, count in enumerate(totals[a]):
                if count >= min_count and n - count >= min_count:
                    table[code] = len(kept)
                    attribute.append(a)
                    value.append(bound[a].labels[code])
                    kept.append(code)
                    counts.append(int(count))
            index[a] = table
        return cls(attributes, attribute, value, kept, np.asarray(counts, np.int64), n, index,
                   tokens, selections, store)

    def close(self) -> None:
        """Remove the temporary codes."""
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # -- reading ----------------------------------------------------------------------

    def shard_songs(self, shard: int) -> np.ndarray:
        """The song index of every selected token of the shard."""
        return np.load(Path(self._dir.name) / f"{shard}.song.npy")

    def shard_labels(self, shard: int) -> np.ndarray:
        """(selected tokens of the shard, attributes) label indices."""
        codes = np.load(Path(self._dir.name) / f"{shard}.npy").astype(np.int64)
        cols = [np.where(codes[:, j] >= 0, self.index[a][np.maximum(codes[:, j], 0)], -1)
                for j, a in enumerate(self.attributes)]
        return np.stack(cols, axis=1) if cols else np.zeros((len(codes), 0), np.int64)

    def chunks(self, chunk_tokens: int, shifts: Sequence[float] = ()) -> Iterator[Chunk]:
        """The selection in chunks of at most ``chunk_tokens`` tokens. ``shifts`` (fractions
        in (0, 1)) give null labels: the shard's label rows rolled by that share of its
        selected tokens (the labels of other songs, the same label counts)."""
        for shard, rows in self.selections:
            if not len(rows):
                continue
            lab = self.shard_labels(shard)
            songs = self.shard_songs(shard)
            rolled = [np.roll(lab, max(1, int(f * len(rows))), axis=0) for f in shifts]
            for s in range(0, len(rows), chunk_tokens):
                e = min(len(rows), s + chunk_tokens)
                yield Chunk(shard, rows[s:e], lab[s:e], [r[s:e] for r in rolled], songs[s:e])

    def n_chunks(self, chunk_tokens: int) -> int:
        return sum(-(-len(rows) // chunk_tokens) for _, rows in self.selections)

    def sample(self, pieces: int, piece_tokens: int) -> list[tuple[int, np.ndarray]]:
        """Up to ``pieces`` evenly spaced runs of ``piece_tokens`` selected tokens (shard, rows)."""
        flat = [(shard, rows) for shard, rows in self.selections if len(rows)]
        if not flat:
            return []
        sizes = np.array([len(r) for _, r in flat])
        starts = np.concatenate(([0], np.cumsum(sizes)))
        total = int(starts[-1])
        piece = min(piece_tokens, total)
        out = []
        for g in np.unique(np.linspace(0, total - piece, pieces).astype(np.int64)):
            k = int(np.searchsorted(starts, g, side="right") - 1)
            s = int(g - starts[k])
            out.append((flat[k][0], flat[k][1][s: s + piece]))
        return out


def read_rows(reader: Any, shard: int, rows: np.ndarray) -> np.ndarray:
    """Activations of the (sorted) ``rows`` of a shard: one read of their span, then a gather."""
    if not len(rows):
        return np.zeros((0, 0), np.float32)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    block = reader.read(shard, lo, hi)
    return block if hi - lo == len(rows) else np.ascontiguousarray(block[rows - lo])

"""Tokens of a probe: selection (note tokens or all), a sample on each side of a song
split, their attribute codes and coordinates, and their activations and latents."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .attributes import COORD_NAMES, compute_attributes

if TYPE_CHECKING:
    from ..interfaces import StoreReader

ENCODE_BATCH = 4096
TOKENS = ("notes", "all")


@dataclass
class Selection:
    """Global indices (store order) and song of every selected token."""

    index: np.ndarray
    song: np.ndarray


def select_tokens(info: StoreReader, tokens: str) -> Selection:
    """Every note token (``tokens: notes``) or every token (``all``) of the store."""
    index, songs = [], []
    for shard in info.shard_table:
        c = info.read_coords(shard.index, ["song", "event_type"])
        keep = np.flatnonzero(c["event_type"] == info.vocabulary.note) if tokens == "notes" \
            else np.arange(len(c["song"]))
        index.append(keep + shard.token_start)
        songs.append(c["song"][keep].astype(np.int64))
    return Selection(np.concatenate(index), np.concatenate(songs))


def sample_sides(sel: Selection, test_songs: np.ndarray, max_train: int, max_test: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(global indices, sorted; test mask): up to ``max_train`` tokens of train songs and
    ``max_test`` of test songs (``test_songs[s]`` True), drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    on_test = test_songs[sel.song]
    parts = []
    for side, cap in ((~on_test, max_train), (on_test, max_test)):
        pool = sel.index[side]
        parts.append(rng.choice(pool, min(cap, len(pool)), replace=False) if len(pool) else pool)
    index = np.sort(np.concatenate(parts))
    test = np.isin(index, parts[1])
    return index, test


@dataclass
class TokenTable:
    """Sampled tokens: global ``index`` (sorted), ``song``, attribute ``codes`` and the
    ``coords`` the input embedding needs."""

    index: np.ndarray
    song: np.ndarray
    codes: dict[str, np.ndarray]
    coords: dict[str, np.ndarray]


def token_table(info: StoreReader, index: np.ndarray, attributes: Sequence[str],
                meters: Mapping[int, Any] | None = None) -> TokenTable:
    """Attribute codes (computed on whole shards) and coordinates of the tokens ``index``."""
    codes: dict[str, list[np.ndarray]] = {a: [] for a in attributes}
    coords: dict[str, list[np.ndarray]] = {k: [] for k in COORD_NAMES}
    for shard in info.shard_table:
        offset, n = shard.token_start, shard.tokens
        rows = index[(index >= offset) & (index < offset + n)] - offset
        if not len(rows):
            continue
        c = info.read_coords(shard.index, COORD_NAMES)
        for a, v in compute_attributes(c, attributes, meters, info.vocabulary).items():
            codes[a].append(v[rows])
        for k in COORD_NAMES:
            coords[k].append(np.asarray(c[k])[rows])
    cat = {k: np.concatenate(v) for k, v in coords.items()}
    return TokenTable(index, cat["song"].astype(np.int64),
                      {a: np.concatenate(v).astype(np.int64) for a, v in codes.items()}, cat)


def read_rows(info: StoreReader, hook: str, index: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    """Raw activations (n, d_model) float32 of the global token ``index`` (sorted)."""
    return info.read_rows(hook, index, chunk)


def encode_rows(raw: np.ndarray, encode: Callable[[Any], Any]) -> Any:
    """Latents of ``raw`` as a scipy CSR matrix (float32), in batches."""
    import scipy.sparse as sp
    import torch

    parts = []
    for s in range(0, len(raw), ENCODE_BATCH):
        with torch.no_grad():
            f = encode(torch.from_numpy(raw[s: s + ENCODE_BATCH]))
        parts.append(sp.csr_matrix(np.asarray(f.float().cpu().numpy(), np.float32)))
    if not parts:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    return sp.vstack(parts).tocsr()

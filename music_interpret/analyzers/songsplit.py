"""The train/test split of songs for analyses that fit anything: the dictionary's own hold-out.

The train stage holds out songs by a seeded hash of their names
(:mod:`music_interpret.learners.holdout`) and records in the dictionary's ``config.json``
(``training``) the fraction, the seed and the held-out song names. An analysis that fits
a probe on latents must test on songs the dictionary never saw: :func:`dictionary_split`
makes the test songs exactly the dictionary's held-out songs and the train songs all the
others. Only a dictionary without that record (or without held-out songs) gets a split of
its own (:func:`own_split`, same hash rule), and the split says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..learners.holdout import holdout_songs


@dataclass(frozen=True)
class SongSplit:
    """``test[s]``: True for store song ``s`` on the test side. ``source`` is ``dictionary``
    (the dictionary's hold-out) or ``own`` (a split made here); ``note`` says which."""

    test: np.ndarray
    source: str
    fraction: float
    seed: int
    note: str

    @property
    def key(self) -> bytes:
        """Equal for equal splits (to share samples between hooks)."""
        return np.packbits(self.test).tobytes()

    @property
    def n_test(self) -> int:
        return int(self.test.sum())

    def of_tokens(self, songs: np.ndarray) -> np.ndarray:
        """True for tokens (given by their song index) on the test side."""
        return self.test[np.asarray(songs, np.int64)]


def own_split(songs: Sequence[str], fraction: float, seed: int, why: str) -> SongSplit:
    """Held-out songs by the train stage's hash rule with ``fraction`` and ``seed``."""
    test = np.zeros(len(songs), bool)
    test[holdout_songs(songs, fraction, seed)] = True
    note = (f"own split ({why}): test songs = hash(seed {seed}) < {fraction:g} "
            f"({int(test.sum())} of {len(songs)} songs), train songs = the rest")
    return SongSplit(test, "own", fraction, seed, note)


def dictionary_split(songs: Sequence[str], config: Mapping[str, Any] | None, fraction: float,
                     seed: int, where: str = "the dictionary") -> SongSplit:
    """Test songs = the held-out songs recorded in a dictionary ``config`` (its
    ``training.holdout_songs``, else recomputed from ``holdout_fraction`` and ``seed``);
    without that record, :func:`own_split` with ``fraction`` and ``seed``."""
    training = (config or {}).get("training")
    training = training if isinstance(training, Mapping) else {}
    held_fraction = training.get("holdout_fraction")
    held_seed = training.get("seed")
    names = training.get("holdout_songs")
    if not isinstance(held_fraction, (int, float)) or not isinstance(held_seed, int):
        return own_split(songs, fraction, seed, f"{where} records no hold-out")
    test = np.zeros(len(songs), bool)
    if isinstance(names, list):
        index = {name: i for i, name in enumerate(songs)}
        test[[index[n] for n in names if n in index]] = True
        how = "as listed in its config.json"
    else:
        test[holdout_songs(songs, float(held_fraction), held_seed)] = True
        how = "recomputed from its holdout_fraction and seed"
    if not test.any() or test.all():
        return own_split(songs, fraction, seed,
                         f"{where} holds out {int(test.sum())} of the store's {len(songs)} songs")
    note = (f"test songs = the songs {where} held out of training ({int(test.sum())} of "
            f"{len(songs)}; holdout_fraction {held_fraction:g}, seed {held_seed}, {how}); "
            f"train songs = all other songs")
    return SongSplit(test, "dictionary", float(held_fraction), int(held_seed), note)

"""Which songs are held out of training (for evaluation), decided by a seeded hash of the name.

A song is held out when sha256(f"{seed}:{song name}"), read as a number in [0, 1), is
below ``fraction``: the choice is stable across runs, stores and song orders, and
the same song is held out for every hook point. With ``fraction > 0`` and at least
two songs, at least one song is held out (the one with the smallest hash) and at
least one song is kept for training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def song_hash(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def holdout_songs(songs: Sequence[str], fraction: float, seed: int = 0) -> list[int]:
    """Indices (into ``songs``) of the held-out songs, sorted."""
    if fraction <= 0 or len(songs) < 2:
        return []
    h = [song_hash(name, seed) for name in songs]
    held = [i for i, v in enumerate(h) if v < fraction]
    if not held:
        held = [min(range(len(songs)), key=h.__getitem__)]
    if len(held) == len(songs):
        held.remove(max(held, key=h.__getitem__))
    return sorted(held)

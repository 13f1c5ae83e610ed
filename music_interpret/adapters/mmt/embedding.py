"""The model's input embedding of stored tokens, rebuilt from their coordinates.

MMT's input at a token is the sum of its six field embeddings (type, beat, position,
pitch, duration, instrument) plus, in absolute-position models, the position
embedding. Hook point ``resid_pre.0`` holds exactly that sum; without it in the store,
:func:`embed_coords` rebuilds the first part from the token coordinates and the rows of
``ModelAdapter.input_embeddings()``. It lacks the position embedding, and uses the
song's own beat: in songs longer than the model's beat range the extract stage shifts
the beats of later windows, so their beat code differs (beats beyond the range are
clipped to its last code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
NOTE_LIMITATION = ("sum of the token's six field embeddings rebuilt from the stored coordinates "
                   "(ModelAdapter.input_embeddings); no position embedding; the song's beat")


def field_offsets(names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(first row, number of rows) of each field in the ``input_embeddings`` names."""
    out: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(names):
        field = name.split("=", 1)[0]
        start, count = out.get(field, (i, 0))
        out[field] = (start, count + 1)
    missing = [f for f in FIELDS if f not in out]
    if missing:
        raise ValueError(f"input embeddings lack the field(s) {', '.join(missing)}")
    return out


def codes_from_coords(coords: Mapping[str, np.ndarray],
                      sizes: Mapping[str, int] | None = None) -> np.ndarray:
    """MMT codes (n, 6) of tokens from their coordinates (-1 = none gives code 0); codes
    beyond a field's vocabulary (``sizes``) are clipped to its last code."""
    from .representation import DURATION_TO_CODE, MAX_DURATION

    def plus_one(name: str) -> np.ndarray:
        v = np.asarray(coords[name]).astype(np.int64)
        return np.where(v >= 0, v + 1, 0)

    duration = np.asarray(coords["duration"]).astype(np.int64)
    instrument = np.asarray(coords["instrument"]).astype(np.int64)
    codes = np.stack([
        np.asarray(coords["event_type"]).astype(np.int64),
        plus_one("beat"), plus_one("position"), plus_one("pitch"),
        np.where(duration >= 0, DURATION_TO_CODE[np.clip(duration, 0, MAX_DURATION)], 0),
        np.where(instrument >= 0, instrument, 0),
    ], axis=1)
    if sizes is not None:
        limit = np.array([sizes[f] - 1 for f in FIELDS])
        codes = np.minimum(codes, limit[None, :])
    return codes


def embed_coords(names: Sequence[str], rows: Any, coords: Mapping[str, np.ndarray]) -> np.ndarray:
    """Float32 (n, d_model): the sum of each token's six field-embedding rows."""
    table = np.asarray(rows.detach().float().cpu().numpy() if hasattr(rows, "detach") else rows,
                       np.float32)
    offsets = field_offsets(names)
    codes = codes_from_coords(coords, {f: offsets[f][1] for f in FIELDS})
    out = np.zeros((len(codes), table.shape[1]), np.float32)
    for j, field in enumerate(FIELDS):
        out += table[offsets[field][0] + codes[:, j]]
    return out

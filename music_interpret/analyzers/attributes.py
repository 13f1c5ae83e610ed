"""Musical attributes of every token, derived from the store's token coordinates.

Each attribute is an integer-coded array over tokens (``int16``) with value labels:
code ``c >= 0`` means ``labels[c]``, :data:`NA` (-1) means "n/a" (the attribute does
not apply to that token, e.g. the pitch of an instrument token). The registry
:data:`ATTRIBUTES` maps a name to its :class:`Attribute`:

* ``event_type``: start-of-song, instrument, start-of-notes, note, end-of-song (every token).
* ``pitch`` (MIDI, labelled ``C4`` = 60), ``pitch_class`` (C..B), ``octave`` (-1..9).
* ``position``: onset inside the beat in 1/12 beat (0..11).
* ``beat_mod4``: song beat modulo 4 (0..3). The meter is **not stored**, so this is
  the beat in the bar only for pieces in 4/4 (or 2/4) that start on a downbeat.
* ``duration``: snapped to MMT's known durations, labelled in beats (``1/2``, ``1``, ``3/2``).
* ``instrument``: MMT instrument name (instrument and note tokens).
* ``interval_from_prev`` / ``interval_to_next``: semitones from the previous note to this
  one / from this note to the next, clipped to +-12 (``<=-12`` .. ``>=+12``);
  ``prev_pitch_class`` / ``next_pitch_class``. "Previous" and "next" are the neighbouring
  note tokens of the same song and instrument in token order (a voice in the chorales;
  in a chord played by one instrument, the neighbouring chord note).

Non-note tokens are n/a for every note attribute; shards hold whole songs, so the
neighbour attributes computed per shard are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..adapters.mmt.representation import DURATION_TO_CODE, INSTRUMENT_NAMES, KNOWN_DURATIONS
from ..errors import UserError
from ..stores.netcdf import EVENT_TYPES, StoreInfo, read_coords

NA = -1
NA_LABEL = "n/a"
NOTE = 3  # event_type code of a note
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAX_INTERVAL = 12
BEAT_NOTE = ("beat_mod4 is the song beat modulo 4: the store holds no meter, so it is the "
             "beat in the bar only for 4/4 (or 2/4) pieces that start on a downbeat")

Coords = Mapping[str, np.ndarray]


class UnknownAttribute(UserError, ValueError):
    """An attribute name that is not in the registry (a UserError and, for configs, a ValueError)."""


@dataclass(frozen=True)
class Attribute:
    """One per-token attribute: value labels and how to compute its codes from coordinates."""

    name: str
    labels: tuple[str, ...]
    doc: str
    compute: Callable[[Coords], np.ndarray]

    def label(self, code: int) -> str:
        return NA_LABEL if code < 0 else self.labels[code]


def _note_mask(c: Coords) -> np.ndarray:
    return (np.asarray(c["event_type"]) == NOTE) & (np.asarray(c["pitch"]) >= 0)


def _where_note(c: Coords, values: np.ndarray) -> np.ndarray:
    return np.where(_note_mask(c), values, NA).astype(np.int16)


def _pitch_name(p: int) -> str:
    return f"{PITCH_CLASSES[p % 12]}{p // 12 - 1}"


def _duration_label(d: int) -> str:
    return str(Fraction(d, 12))


def _interval_label(i: int) -> str:
    if i <= -MAX_INTERVAL:
        return f"<=-{MAX_INTERVAL}"
    if i >= MAX_INTERVAL:
        return f">=+{MAX_INTERVAL}"
    return f"{i:+d}" if i else "0"


def neighbours(c: Coords) -> tuple[np.ndarray, np.ndarray]:
    """(prev, next): index of the previous / next note token of the same song and instrument
    (in song-token order) for every token; -1 where there is none or the token is no note."""
    n = len(c["event_type"])
    prev = np.full(n, -1, np.int64)
    nxt = np.full(n, -1, np.int64)
    notes = np.flatnonzero(_note_mask(c))
    if len(notes) < 2:
        return prev, nxt
    song = np.asarray(c["song"])[notes]
    inst = np.asarray(c["instrument"])[notes]
    order = notes[np.lexsort((np.asarray(c["song_token"])[notes], inst, song))]
    same = (np.asarray(c["song"])[order[1:]] == np.asarray(c["song"])[order[:-1]]) & (
        np.asarray(c["instrument"])[order[1:]] == np.asarray(c["instrument"])[order[:-1]])
    prev[order[1:][same]] = order[:-1][same]
    nxt[order[:-1][same]] = order[1:][same]
    return prev, nxt


def _neighbour_cache(c: Coords) -> tuple[np.ndarray, np.ndarray]:
    cached = c.get("_neighbours") if isinstance(c, dict) else None
    if cached is None:
        cached = neighbours(c)
        if isinstance(c, dict):
            c["_neighbours"] = cached  # type: ignore[index]
    return cached


def _interval(c: Coords, direction: str) -> np.ndarray:
    prev, nxt = _neighbour_cache(c)
    other = prev if direction == "prev" else nxt
    pitch = np.asarray(c["pitch"]).astype(np.int64)
    ok = other >= 0
    step = np.zeros(len(pitch), np.int64)
    delta = pitch - pitch[np.maximum(other, 0)]
    step[ok] = delta[ok] if direction == "prev" else -delta[ok]
    codes = np.clip(step, -MAX_INTERVAL, MAX_INTERVAL) + MAX_INTERVAL
    return np.where(ok, codes, NA).astype(np.int16)


def _neighbour_pc(c: Coords, direction: str) -> np.ndarray:
    prev, nxt = _neighbour_cache(c)
    other = prev if direction == "prev" else nxt
    pitch = np.asarray(c["pitch"]).astype(np.int64)
    return np.where(other >= 0, pitch[np.maximum(other, 0)] % 12, NA).astype(np.int16)


def _duration(c: Coords) -> np.ndarray:
    d = np.clip(np.asarray(c["duration"]).astype(np.int64), 0, len(DURATION_TO_CODE) - 1)
    codes = DURATION_TO_CODE[d] - 1
    return np.where(_note_mask(c) & (np.asarray(c["duration"]) > 0), codes, NA).astype(np.int16)


def _instrument(c: Coords) -> np.ndarray:
    inst = np.asarray(c["instrument"]).astype(np.int64)
    ok = (inst >= 0) & (inst < len(INSTRUMENT_NAMES))
    return np.where(ok, inst, NA).astype(np.int16)


def _event_type(c: Coords) -> np.ndarray:
    e = np.asarray(c["event_type"]).astype(np.int64)
    return np.where((e >= 0) & (e < len(EVENT_TYPES)), e, NA).astype(np.int16)


def _pitch(c: Coords) -> np.ndarray:
    return _where_note(c, np.clip(np.asarray(c["pitch"]), 0, 127))


def _beat_mod4(c: Coords) -> np.ndarray:
    beat = np.asarray(c["beat"]).astype(np.int64)
    return np.where(_note_mask(c) & (beat >= 0), beat % 4, NA).astype(np.int16)


def _position(c: Coords) -> np.ndarray:
    pos = np.asarray(c["position"]).astype(np.int64)
    return np.where(_note_mask(c) & (pos >= 0) & (pos < 12), pos, NA).astype(np.int16)


_INTERVALS = tuple(_interval_label(i) for i in range(-MAX_INTERVAL, MAX_INTERVAL + 1))

ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    Attribute("event_type", EVENT_TYPES, "MMT event type (every token)", _event_type),
    Attribute("pitch", tuple(_pitch_name(p) for p in range(128)), "MIDI pitch (C4 = 60)", _pitch),
    Attribute("pitch_class", PITCH_CLASSES, "pitch class",
              lambda c: _where_note(c, np.asarray(c["pitch"]) % 12)),
    Attribute("octave", tuple(str(o) for o in range(-1, 10)), "octave (C4 = middle C)",
              lambda c: _where_note(c, np.clip(np.asarray(c["pitch"]), 0, 127) // 12)),
    Attribute("position", tuple(str(p) for p in range(12)), "onset inside the beat, 1/12 beat",
              _position),
    Attribute("beat_mod4", ("0", "1", "2", "3"), BEAT_NOTE, _beat_mod4),
    Attribute("duration", tuple(_duration_label(d) for d in KNOWN_DURATIONS),
              "duration in beats, snapped to MMT's known durations", _duration),
    Attribute("instrument", ("none", *INSTRUMENT_NAMES[1:]), "MMT instrument", _instrument),
    Attribute("interval_from_prev", _INTERVALS,
              "semitones from the previous note of the same instrument (clipped to +-12)",
              lambda c: _interval(c, "prev")),
    Attribute("interval_to_next", _INTERVALS,
              "semitones to the next note of the same instrument (clipped to +-12)",
              lambda c: _interval(c, "next")),
    Attribute("prev_pitch_class", PITCH_CLASSES,
              "pitch class of the previous note of the same instrument",
              lambda c: _neighbour_pc(c, "prev")),
    Attribute("next_pitch_class", PITCH_CLASSES,
              "pitch class of the next note of the same instrument",
              lambda c: _neighbour_pc(c, "next")),
)}

#: coordinates the attributes read
COORD_NAMES = ("song", "song_token", "event_type", "beat", "position", "pitch", "duration",
               "instrument")


def attribute_names() -> list[str]:
    """Names of every known attribute, in registry order."""
    return list(ATTRIBUTES)


def resolve_attributes(names: Sequence[str] | None, where: str = "attributes") -> list[str]:
    """``names`` checked against the registry (all attributes when empty or None)."""
    if not names:
        return attribute_names()
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise UnknownAttribute(f"{where}: unknown attribute(s) {', '.join(map(repr, unknown))} "
                               f"(known: {', '.join(ATTRIBUTES)})")
    if len(set(names)) != len(names):
        raise UnknownAttribute(f"{where}: an attribute is listed twice in {list(names)}")
    return list(names)


def compute_attributes(coords: Coords, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Codes (int16, -1 = n/a) of each attribute in ``names`` for the tokens of ``coords``.

    ``coords`` must hold whole songs for the neighbour attributes to be exact.
    """
    work = dict(coords)
    return {name: ATTRIBUTES[name].compute(work) for name in resolve_attributes(names)}


def iter_store_attributes(info: StoreInfo, names: Sequence[str], max_tokens: int | None = None,
                          ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """``(shard, n_tokens, codes)`` per shard of a store, stopping after ``max_tokens`` tokens
    (the first ones in store order); codes are computed on whole shards, then cut."""
    left = info.n_tokens if max_tokens is None else min(max_tokens, info.n_tokens)
    for index, shard in enumerate(info.shards):
        if left <= 0:
            return
        coords = read_coords(shard, COORD_NAMES)
        n = min(left, len(coords["song"]))
        codes = compute_attributes(coords, names)
        yield index, n, {k: v[:n] for k, v in codes.items()}
        left -= n

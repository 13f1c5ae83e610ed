"""Musical attributes of every token, derived from the store's token coordinates.

Each attribute is an integer-coded array over tokens (``int16``) with value labels:
code ``c >= 0`` means ``labels[c]``, :data:`NA` (-1) means "n/a" (the attribute does
not apply to that token, e.g. the pitch of an instrument token). The registry
:data:`ATTRIBUTES` maps a name to its :class:`Attribute`; the event types, instruments,
durations and which event is a note come from the store's
:class:`~music_interpret.doors.EventVocabulary` (:func:`attributes_for`; ``ATTRIBUTES``
uses the default adapter's, for coordinates that name no store).

**At t and at t+1.** The model at token t predicts token t+1, and every token embeds its
own input, so an attribute of token t mostly tells whether the residual stream still
carries its input. Every attribute ``X`` therefore also exists as ``next.X``: the same
attribute of the token that follows t *in the model's input window* (what the model is
predicting at t). ``next.X`` is n/a where the window ends after t (the last note a
non-final window owns is followed there by an artificial end-of-song); after a song's
last note, ``next.event_type`` is end-of-song.

Attributes of the token itself:

* ``event_type``: the vocabulary's events (MMT: start-of-song, instrument, start-of-notes,
  note, end-of-song), every token.
* ``pitch`` (MIDI, labelled ``C4`` = 60), ``pitch_class`` (C..B), ``octave`` (-1..9).
* ``position``: onset inside the beat in twelfths of a beat (0..11; ``3`` is the second
  sixteenth, ``6`` the second eighth).
* ``beat_step``: beats from the previous token's onset in the window (0..3, ``4+``).
* ``beat_mod4``: song beat modulo 4. It is the beat in the bar only for pieces in 4/4
  (or 2/4) that start on a downbeat; ``metric_strength`` uses the real metre.
* ``duration``: snapped to the vocabulary's durations, labelled in beats (``1/2``, ``1``, ``3/2``).
* ``instrument``: the vocabulary's instrument name (tokens that carry an instrument).
* ``voice_interval_from_prev`` / ``voice_interval_to_next``: semitones from the previous
  note to this one / from this note to the next, clipped to +-12;
  ``voice_prev_pitch_class`` / ``voice_next_pitch_class``. "Previous" and "next" are the
  neighbouring note tokens of the same song and instrument in token order (a voice in
  the chorales; in a chord played by one instrument, the neighbouring chord note). The
  names without ``voice_`` of earlier versions are accepted as aliases.
* Music theory (:mod:`~music_interpret.analyzers.theory`, computed over the whole
  song's notes): ``key`` (the piece's), ``local_key`` (within 4 beats either side),
  ``scale_degree`` (relative to the local key), ``chord_root``, ``chord_quality`` and
  ``roman_numeral`` of the sonority at the note's onset, ``voice_role`` (alone, top,
  bass, inner), and ``metric_strength`` (downbeat, strong, beat, offbeat) from the time
  signatures the dataset records (n/a without them).

Non-note tokens are n/a for every note attribute; shards hold whole songs, so the
song-level attributes computed per shard are exact.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..doors import EventVocabulary
from ..errors import UserError
from . import theory

if TYPE_CHECKING:
    from ..interfaces import StoreReader

NA = -1
NA_LABEL = "n/a"
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAX_INTERVAL = 12
MAX_STEP = 4
NEXT = "next."
BEAT_NOTE = ("beat_mod4 is the song beat modulo 4: the store holds no meter, so it is the "
             "beat in the bar only for 4/4 (or 2/4) pieces that start on a downbeat; "
             "metric_strength uses the time signatures where the dataset records them")
ALIASES = {"interval_from_prev": "voice_interval_from_prev",
           "interval_to_next": "voice_interval_to_next",
           "prev_pitch_class": "voice_prev_pitch_class",
           "next_pitch_class": "voice_next_pitch_class"}

Coords = Mapping[str, np.ndarray]
V = EventVocabulary


class UnknownAttribute(UserError, ValueError):
    """An attribute name that is not in the registry (a UserError and, for configs, a ValueError)."""


@dataclass(frozen=True)
class Attribute:
    """One per-token attribute: value labels and how to compute its codes from coordinates,
    in an event vocabulary (``vocabulary``; None: the default adapter's).

    ``when`` is ``"t"`` for an attribute of the token itself and ``"t+1"`` for one of the
    token the model predicts (``next.X``).
    """

    name: str
    labels_of: Callable[[V], tuple[str, ...]]
    doc: str
    codes_of: Callable[[Coords, V], np.ndarray]
    when: str = "t"
    vocabulary: V | None = None

    @property
    def vocab(self) -> V:
        """The vocabulary the labels and codes are in."""
        if self.vocabulary is not None:
            return self.vocabulary
        from ..vocabulary import default_vocabulary

        return default_vocabulary()

    @property
    def labels(self) -> tuple[str, ...]:
        return _labels(self.labels_of, self.vocab)

    def label(self, code: int) -> str:
        return NA_LABEL if code < 0 else self.labels[code]

    def compute(self, coords: Coords) -> np.ndarray:
        """Codes (int16, -1 = n/a) of the tokens of ``coords``."""
        return self.codes_of(coords, self.vocab)

    def bound(self, vocabulary: V) -> Attribute:
        """The attribute in ``vocabulary``."""
        return dataclasses.replace(self, vocabulary=vocabulary)

    @property
    def base(self) -> str:
        """The attribute of the token itself (``pitch`` for ``next.pitch``)."""
        return self.name[len(NEXT):] if self.name.startswith(NEXT) else self.name


@functools.lru_cache(maxsize=256)
def _labels(labels_of: Callable[[V], tuple[str, ...]], vocabulary: V) -> tuple[str, ...]:
    return tuple(labels_of(vocabulary))


def _fixed(labels: Sequence[str]) -> Callable[[V], tuple[str, ...]]:
    """Labels that do not depend on the vocabulary."""
    fixed = tuple(labels)
    return lambda v: fixed


def _note_mask(c: Coords, v: V) -> np.ndarray:
    return (np.asarray(c["event_type"]) == v.note) & (np.asarray(c["pitch"]) >= 0)


def _where_note(c: Coords, v: V, values: np.ndarray) -> np.ndarray:
    return np.where(_note_mask(c, v), values, NA).astype(np.int16)


def _pitch_name(p: int) -> str:
    return f"{PITCH_CLASSES[p % 12]}{p // 12 - 1}"


def _interval_label(i: int) -> str:
    if i <= -MAX_INTERVAL:
        return f"<=-{MAX_INTERVAL}"
    if i >= MAX_INTERVAL:
        return f">=+{MAX_INTERVAL}"
    return f"{i:+d}" if i else "0"


def neighbours(c: Coords, vocabulary: V | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prev, next): index of the previous / next note token of the same song and instrument
    (in song-token order) for every token; -1 where there is none or the token is no note."""
    v = vocabulary or _default()
    n = len(c["event_type"])
    prev = np.full(n, -1, np.int64)
    nxt = np.full(n, -1, np.int64)
    notes = np.flatnonzero(_note_mask(c, v))
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


def _default() -> V:
    from ..vocabulary import default_vocabulary

    return default_vocabulary()


def _neighbour_cache(c: Coords, v: V) -> tuple[np.ndarray, np.ndarray]:
    cached = c.get("_neighbours") if isinstance(c, dict) else None
    if cached is None:
        cached = neighbours(c, v)
        if isinstance(c, dict):
            c["_neighbours"] = cached  # type: ignore[index]
    return cached


def _interval(c: Coords, v: V, direction: str) -> np.ndarray:
    prev, nxt = _neighbour_cache(c, v)
    other = prev if direction == "prev" else nxt
    pitch = np.asarray(c["pitch"]).astype(np.int64)
    ok = other >= 0
    step = np.zeros(len(pitch), np.int64)
    delta = pitch - pitch[np.maximum(other, 0)]
    step[ok] = delta[ok] if direction == "prev" else -delta[ok]
    codes = np.clip(step, -MAX_INTERVAL, MAX_INTERVAL) + MAX_INTERVAL
    return np.where(ok, codes, NA).astype(np.int16)


def _neighbour_pc(c: Coords, v: V, direction: str) -> np.ndarray:
    prev, nxt = _neighbour_cache(c, v)
    other = prev if direction == "prev" else nxt
    pitch = np.asarray(c["pitch"]).astype(np.int64)
    return np.where(other >= 0, pitch[np.maximum(other, 0)] % 12, NA).astype(np.int16)


def _duration(c: Coords, v: V) -> np.ndarray:
    """Index of the nearest of the vocabulary's durations (the shorter one on a tie)."""
    d = np.asarray(c["duration"]).astype(np.int64)
    known = np.asarray(v.durations, np.int64)
    if not len(known):
        return np.full(len(d), NA, np.int16)
    right = np.clip(np.searchsorted(known, d), 1, len(known) - 1) if len(known) > 1 \
        else np.zeros(len(d), np.int64)
    left = np.maximum(right - 1, 0)
    codes = np.where(np.abs(known[right] - d) < np.abs(d - known[left]), right, left)
    return np.where(_note_mask(c, v) & (d > 0), codes, NA).astype(np.int16)


def _instrument(c: Coords, v: V) -> np.ndarray:
    inst = np.asarray(c["instrument"]).astype(np.int64)
    ok = (inst >= 0) & (inst < len(v.instruments))
    return np.where(ok, inst, NA).astype(np.int16)


def _event_type(c: Coords, v: V) -> np.ndarray:
    e = np.asarray(c["event_type"]).astype(np.int64)
    return np.where((e >= 0) & (e < len(v.events)), e, NA).astype(np.int16)


def _pitch(c: Coords, v: V) -> np.ndarray:
    return _where_note(c, v, np.clip(np.asarray(c["pitch"]), 0, 127))


def _beat_mod4(c: Coords, v: V) -> np.ndarray:
    beat = np.asarray(c["beat"]).astype(np.int64)
    return np.where(_note_mask(c, v) & (beat >= 0), beat % 4, NA).astype(np.int16)


def _position(c: Coords, v: V) -> np.ndarray:
    pos = np.asarray(c["position"]).astype(np.int64)
    return np.where(_note_mask(c, v) & (pos >= 0) & (pos < 12), pos, NA).astype(np.int16)


def next_index(c: Coords, vocabulary: V | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(next, ends): for every token, the index of the token after it in its model window
    (-1 where it is not stored or the window ends there), and whether the song ends after
    it (its next token is the song's real end, stored or not)."""
    cached = c.get("_next") if isinstance(c, dict) else None
    if cached is not None:
        return cached
    v = vocabulary or _default()
    n = len(c["event_type"])
    song = np.asarray(c["song"]).astype(np.int64)
    pos = np.asarray(c["song_token"]).astype(np.int64)
    window = np.asarray(c.get("window", np.zeros(n))).astype(np.int64)
    order = np.lexsort((pos, song))
    nxt = np.full(n, -1, np.int64)
    follows = (song[order[1:]] == song[order[:-1]]) & (pos[order[1:]] == pos[order[:-1]] + 1) \
        & (window[order[1:]] == window[order[:-1]])
    nxt[order[:-1][follows]] = order[1:][follows]
    # the song's last note: its next token is the song's end, stored or not
    ends = np.zeros(n, bool)
    notes = np.flatnonzero(_note_mask(c, v))
    if len(notes) and v.end is not None:
        last = {}
        for i in notes[np.lexsort((pos[notes], song[notes]))]:
            last[song[i]] = i
        ends[list(last.values())] = True
    etype = np.asarray(c["event_type"])
    if v.end is not None:
        ends[(nxt >= 0) & (etype[np.maximum(nxt, 0)] == v.end)] = True
    if isinstance(c, dict):
        c["_next"] = (nxt, ends)  # type: ignore[index]
    return nxt, ends


def _beat_step(c: Coords, v: V) -> np.ndarray:
    """Beats from the onset of the previous note token in the window (0..3, 4+)."""
    nxt, _ = next_index(c, v)
    prev = np.full(len(nxt), -1, np.int64)
    prev[nxt[nxt >= 0]] = np.flatnonzero(nxt >= 0)
    beat = np.asarray(c["beat"]).astype(np.int64)
    note = _note_mask(c, v)
    ok = note & (prev >= 0) & note[np.maximum(prev, 0)]
    step = np.clip(beat - beat[np.maximum(prev, 0)], 0, MAX_STEP)
    return np.where(ok, step, NA).astype(np.int16)


def _song_theory(c: Coords, v: V) -> dict[str, np.ndarray]:
    """Theory codes of every token (-1 off notes), computed song by song; cached in ``c``."""
    cached = c.get("_theory") if isinstance(c, dict) else None
    if cached is not None:
        return cached
    n = len(c["event_type"])
    names = ("key", "local_key", "scale_degree", "chord_root", "chord_quality",
             "roman_numeral", "voice_role", "metric_strength")
    out = {k: np.full(n, NA, np.int64) for k in names}
    notes = np.flatnonzero(_note_mask(c, v))
    song = np.asarray(c["song"]).astype(np.int64)
    meters = c.get("_meters") or {}
    if len(notes):
        onset_all = (np.asarray(c["beat"]).astype(np.int64) * theory.TICKS
                     + np.maximum(np.asarray(c["position"]).astype(np.int64), 0))
        for s_id in np.unique(song[notes]):
            idx = notes[song[notes] == s_id]
            onset = onset_all[idx]
            pitch = np.asarray(c["pitch"])[idx].astype(np.int64)
            dur = np.maximum(np.asarray(c["duration"])[idx].astype(np.int64), 1)
            key = theory.piece_key(pitch, dur)
            local = theory.local_keys(onset, pitch, dur)
            root, quality = theory.chords(onset, pitch, dur)
            out["key"][idx] = key
            out["local_key"][idx] = local
            out["scale_degree"][idx] = theory.scale_degrees(pitch, local)
            out["chord_root"][idx] = root
            out["chord_quality"][idx] = quality
            out["roman_numeral"][idx] = theory.roman_numerals(root, quality, local)
            out["voice_role"][idx] = theory.voice_roles(onset, pitch, dur)
            out["metric_strength"][idx] = theory.metric_strength(onset, meters.get(int(s_id)))
    if isinstance(c, dict):
        c["_theory"] = out  # type: ignore[index]
    return out


def _theory(name: str) -> Callable[[Coords, V], np.ndarray]:
    return lambda c, v: _song_theory(c, v)[name].astype(np.int16)


_INTERVALS = tuple(_interval_label(i) for i in range(-MAX_INTERVAL, MAX_INTERVAL + 1))

BASE_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("event_type", lambda v: v.events, "event type (every token)", _event_type),
    Attribute("pitch", _fixed(_pitch_name(p) for p in range(128)), "MIDI pitch (C4 = 60)", _pitch),
    Attribute("pitch_class", _fixed(PITCH_CLASSES), "pitch class",
              lambda c, v: _where_note(c, v, np.asarray(c["pitch"]) % 12)),
    Attribute("octave", _fixed(str(o) for o in range(-1, 10)), "octave (C4 = middle C)",
              lambda c, v: _where_note(c, v, np.clip(np.asarray(c["pitch"]), 0, 127) // 12)),
    Attribute("position", _fixed(str(p) for p in range(12)),
              "onset inside the beat in twelfths of a beat (3: the second sixteenth)", _position),
    Attribute("beat_step", _fixed(("0", "1", "2", "3", f"{MAX_STEP}+")),
              "beats from the previous note token's onset in the window", _beat_step),
    Attribute("beat_mod4", _fixed(("0", "1", "2", "3")), BEAT_NOTE, _beat_mod4),
    Attribute("duration", lambda v: tuple(v.duration_label(i) for i in range(len(v.durations))),
              "duration in beats, snapped to the vocabulary's durations", _duration),
    Attribute("instrument", lambda v: ("none", *v.instruments[1:]), "instrument", _instrument),
    Attribute("voice_interval_from_prev", _fixed(_INTERVALS),
              "semitones from the previous note of the same instrument (clipped to +-12)",
              lambda c, v: _interval(c, v, "prev")),
    Attribute("voice_interval_to_next", _fixed(_INTERVALS),
              "semitones to the next note of the same instrument (clipped to +-12)",
              lambda c, v: _interval(c, v, "next")),
    Attribute("voice_prev_pitch_class", _fixed(PITCH_CLASSES),
              "pitch class of the previous note of the same instrument",
              lambda c, v: _neighbour_pc(c, v, "prev")),
    Attribute("voice_next_pitch_class", _fixed(PITCH_CLASSES),
              "pitch class of the next note of the same instrument",
              lambda c, v: _neighbour_pc(c, v, "next")),
    Attribute("key", _fixed(theory.KEYS), "key of the whole piece (Krumhansl-Kessler)",
              _theory("key")),
    Attribute("local_key", _fixed(theory.KEYS), "key of the notes within 4 beats of the onset",
              _theory("local_key")),
    Attribute("scale_degree", _fixed(theory.DEGREES), "pitch class relative to the local key's tonic",
              _theory("scale_degree")),
    Attribute("chord_root", _fixed(theory.PITCH_CLASSES), "root of the chord sounding at the onset",
              _theory("chord_root")),
    Attribute("chord_quality", _fixed(theory.CHORD_QUALITIES),
              "quality of the chord sounding at the onset", _theory("chord_quality")),
    Attribute("roman_numeral", _fixed(theory.ROMAN_NUMERALS),
              "chord at the onset relative to the local key", _theory("roman_numeral")),
    Attribute("voice_role", _fixed(theory.VOICE_ROLES),
              "the note among those sounding at its onset (alone, top, bass, inner)",
              _theory("voice_role")),
    Attribute("metric_strength", _fixed(theory.METRIC),
              "downbeat, strong beat, other beat or offbeat under the recorded time signature",
              _theory("metric_strength")),
)


def _at_next(base: Attribute) -> Callable[[Coords, V], np.ndarray]:
    def compute(c: Coords, v: V) -> np.ndarray:
        codes = base.codes_of(c, v)
        nxt, ends = next_index(c, v)
        out = np.where(nxt >= 0, codes[np.maximum(nxt, 0)], NA)
        if base.name == "event_type" and v.end is not None:
            out = np.where(ends, v.end, out)
        return out.astype(np.int16)

    return compute


def _next_attribute(base: Attribute) -> Attribute:
    return Attribute(NEXT + base.name, base.labels_of,
                     f"{base.doc}, of the token after t in the model window (what t predicts)",
                     _at_next(base), when="t+1")


#: every attribute, in the default adapter's vocabulary (labels resolved on first use)
ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    *BASE_ATTRIBUTES, *(_next_attribute(a) for a in BASE_ATTRIBUTES))}

#: coordinates the attributes read
SONG_KEY = "__song__"  # not an attribute: the song index of each token, next to the codes
COORD_NAMES = ("song", "song_token", "window", "seq_pos", "event_type", "beat", "position",
               "pitch", "duration", "instrument")


@functools.lru_cache(maxsize=16)
def attributes_for(vocabulary: V | None) -> dict[str, Attribute]:
    """Every attribute in ``vocabulary`` (None: the default adapter's)."""
    if vocabulary is None:
        return ATTRIBUTES
    return {name: a.bound(vocabulary) for name, a in ATTRIBUTES.items()}


def attribute_names() -> list[str]:
    """Names of every known attribute, in registry order."""
    return list(ATTRIBUTES)


def resolve_attributes(names: Sequence[str] | None, where: str = "attributes") -> list[str]:
    """``names`` checked against the registry (all attributes when empty or None)."""
    if not names:
        return attribute_names()
    names = [ALIASES.get(n, n) for n in names]
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise UnknownAttribute(f"{where}: unknown attribute(s) {', '.join(map(repr, unknown))} "
                               f"(known: {', '.join(ATTRIBUTES)})")
    if len(set(names)) != len(names):
        raise UnknownAttribute(f"{where}: an attribute is listed twice in {list(names)}")
    return list(names)


def compute_attributes(coords: Coords, names: Sequence[str] | None = None,
                       meters: Mapping[int, Sequence[tuple[float, int, int]]] | None = None,
                       vocabulary: V | None = None) -> dict[str, np.ndarray]:
    """Codes (int16, -1 = n/a) of each attribute in ``names`` for the tokens of ``coords``.

    ``coords`` must hold whole songs for the song-level attributes to be exact;
    ``meters`` maps a song index to its time signatures ``(start beat, numerator,
    denominator)`` (``metric_strength`` is n/a for songs without); ``vocabulary``: the
    event vocabulary of the coordinates (None: the default adapter's).
    """
    work: dict[str, Any] = dict(coords)
    work["_meters"] = dict(meters or {})
    table = attributes_for(vocabulary)
    return {name: table[name].compute(work) for name in resolve_attributes(names)}


def iter_store_attributes(info: StoreReader, names: Sequence[str], max_tokens: int | None = None,
                          meters: Mapping[int, Sequence[tuple[float, int, int]]] | None = None,
                          ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """``(shard, n_tokens, codes)`` per shard of a store, stopping after ``max_tokens`` tokens
    (the first ones in store order); codes are computed on whole shards, then cut. The
    codes also hold ``SONG_KEY``: each token's song index."""
    for index, n, coords in info.iter_coords(COORD_NAMES, max_tokens):
        codes = compute_attributes(coords, names, meters, info.vocabulary)
        codes[SONG_KEY] = np.asarray(coords["song"]).astype(np.int64)
        yield index, n, {k: v[:n] for k, v in codes.items()}

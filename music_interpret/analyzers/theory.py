"""Music-theory labels of the notes of one song, computed from the notes alone (numpy).

Every function takes a song's notes as arrays in token order (onset in ticks of 1/12
beat, duration in ticks, MIDI pitch) and returns one integer code per note (-1: not
defined). The rules, stated so that a label means one thing:

* **key** (whole piece) and **local key** (the notes sounding within ``LOCAL_BEATS``
  beats either side of the note's onset): the Krumhansl-Kessler key profile that
  correlates best with the duration-weighted pitch-class histogram; 24 keys, codes
  ``tonic`` (C major .. B major) and ``12 + tonic`` (C minor .. B minor).
* **scale degree**: the note's pitch class relative to the local key's tonic, in
  semitones, named ``1 b2 2 b3 3 4 #4 5 b6 6 b7 7``.
* **chord** at the note's onset, from the pitch classes sounding then (every note
  whose span covers the onset): the simplest template (major, minor, diminished,
  augmented triad; dominant, major, minor, half-diminished, diminished seventh)
  that contains every sounding pitch class and all of its own tones but perhaps a
  perfect fifth; undefined with fewer than two pitch classes, for a bare fifth, or
  when no template holds them all (a passing tone makes the sonority no chord). Reported as root
  (pitch class), quality, and roman numeral relative to the local key (case by
  quality, ``°`` diminished, ``+`` augmented, ``ø7`` half-diminished, ``b``/``#``
  for roots outside the key's diatonic degrees).
* **voice role** at the note's onset among all notes sounding then: ``alone``,
  ``top``, ``bass`` or ``inner``.
* **metric strength** from the song's time signatures (when the dataset records
  them): ``downbeat`` (bar start), ``strong`` (the other strong beat of 4/4, 12/8,
  ...), ``beat`` (another beat of the metre; compound metres beat in dotted
  quarters), ``offbeat`` (between beats).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TICKS = 12  # MMT time steps per beat (a beat is a quarter note)
LOCAL_BEATS = 4
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

# Krumhansl & Kessler (1982) probe-tone profiles, tonic first
_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
KEYS = tuple(f"{pc} major" for pc in PITCH_CLASSES) + tuple(f"{pc} minor" for pc in PITCH_CLASSES)
DEGREES = ("1", "b2", "2", "b3", "3", "4", "#4", "5", "b6", "6", "b7", "7")

# chord templates: name, intervals above the root, roman-numeral suffix, upper case
_CHORDS: tuple[tuple[str, tuple[int, ...], str, bool], ...] = (
    ("major", (0, 4, 7), "", True),
    ("minor", (0, 3, 7), "", False),
    ("diminished", (0, 3, 6), "°", False),
    ("augmented", (0, 4, 8), "+", True),
    ("dominant7", (0, 4, 7, 10), "7", True),
    ("major7", (0, 4, 7, 11), "maj7", True),
    ("minor7", (0, 3, 7, 10), "7", False),
    ("half-diminished7", (0, 3, 6, 10), "ø7", False),
    ("diminished7", (0, 3, 6, 9), "°7", False),
)
CHORD_QUALITIES = tuple(c[0] for c in _CHORDS)
# roman numerals of the 12 roots above the tonic (major-key spelling; minor keys use the
# same names relative to their own tonic, so bIII is the relative major's root)
_ROOT_NUMERALS = ("I", "bII", "II", "bIII", "III", "IV", "#IV", "V", "bVI", "VI", "bVII", "VII")
ROMAN_NUMERALS = tuple(
    (numeral if upper else numeral.lower()) + suffix
    for numeral in _ROOT_NUMERALS
    for _, _, suffix, upper in _CHORDS
)
VOICE_ROLES = ("alone", "top", "bass", "inner")
METRIC = ("downbeat", "strong", "beat", "offbeat")


def _profiles() -> np.ndarray:
    """(24, 12) z-scored key profiles: rows C major..B major, C minor..B minor."""
    rows = [np.roll(_MAJOR, t) for t in range(12)] + [np.roll(_MINOR, t) for t in range(12)]
    out = np.array(rows)
    out -= out.mean(axis=1, keepdims=True)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


_PROFILES = _profiles()


def key_of(histograms: np.ndarray) -> np.ndarray:
    """Best key code (0..23) of each duration-weighted pitch-class histogram (n, 12);
    -1 where a histogram is empty or flat."""
    h = np.asarray(histograms, np.float64)
    centred = h - h.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(centred, axis=-1)
    scores = centred @ _PROFILES.T
    best = np.argmax(scores, axis=-1)
    return np.where(norm > 0, best, -1)


def _weights(duration: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(duration, np.float64), 1.0)


def piece_key(pitch: np.ndarray, duration: np.ndarray) -> int:
    """Key code of the whole song (-1 without notes)."""
    hist = np.bincount(np.asarray(pitch) % 12, weights=_weights(duration), minlength=12)
    return int(key_of(hist[None])[0])


def local_keys(onset: np.ndarray, pitch: np.ndarray, duration: np.ndarray,
               beats: int = LOCAL_BEATS) -> np.ndarray:
    """Key code of each note from the notes whose onsets lie within ``beats`` beats of its onset."""
    onset = np.asarray(onset, np.int64)
    order = np.argsort(onset, kind="stable")
    t = onset[order]
    onehot = np.zeros((len(t), 12))
    onehot[np.arange(len(t)), np.asarray(pitch)[order] % 12] = _weights(np.asarray(duration)[order])
    prefix = np.vstack([np.zeros(12), np.cumsum(onehot, axis=0)])
    lo = np.searchsorted(t, onset - beats * TICKS, side="left")
    hi = np.searchsorted(t, onset + beats * TICKS, side="right")
    return key_of(prefix[hi] - prefix[lo])


def scale_degrees(pitch: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Semitones (0..11) of each pitch class above its key's tonic; -1 where the key is."""
    keys = np.asarray(keys)
    return np.where(keys >= 0, (np.asarray(pitch) - keys % 12) % 12, -1)


def _sounding(onset: np.ndarray, duration: np.ndarray, values: np.ndarray, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(unique onsets, counts (U, width)) of the ``values`` sounding at each unique onset."""
    onset = np.asarray(onset, np.int64)
    end = onset + np.maximum(np.asarray(duration, np.int64), 1)
    times = np.unique(onset)
    start_at = np.searchsorted(times, onset)  # every onset is in times
    stop_at = np.searchsorted(times, end)  # first unique onset at or after the end
    delta = np.zeros((len(times) + 1, width), np.int32)
    np.add.at(delta, (start_at, values), 1)
    np.add.at(delta, (stop_at, values), -1)
    return times, np.cumsum(delta, axis=0)[:-1]


def _holds(pcs: set[int], root: int, intervals: tuple[int, ...]) -> bool:
    """Whether the chord on ``root`` holds every pitch class of ``pcs`` and all its own
    tones but perhaps the perfect fifth (a bare root and fifth is no chord)."""
    tones = {(root + i) % 12 for i in intervals}
    fifth = {(root + 7) % 12}
    return pcs <= tones and tones - pcs <= fifth and pcs != {root} | fifth


def _chord_table() -> tuple[np.ndarray, np.ndarray]:
    """For every 12-bit pitch-class set: (root, quality index), -1 where no chord."""
    root = np.full(1 << 12, -1, np.int64)
    quality = np.full(1 << 12, -1, np.int64)
    for mask in range(1 << 12):
        pcs = [p for p in range(12) if mask >> p & 1]
        if len(pcs) < 2:
            continue
        for q, (_, intervals, _, _) in enumerate(_CHORDS):  # simplest template first
            roots = [r for r in range(12) if _holds(set(pcs), r, intervals)]
            if roots:
                root[mask], quality[mask] = roots[0], q
                break
    return root, quality


_CHORD_ROOT, _CHORD_QUALITY = _chord_table()


def chords(onset: np.ndarray, pitch: np.ndarray, duration: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(root pitch class, quality index) of the sonority at each note's onset (-1: no chord)."""
    if len(onset) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    times, counts = _sounding(onset, duration, np.asarray(pitch) % 12, 12)
    masks = ((counts > 0).astype(np.int64) << np.arange(12)).sum(axis=1)
    at = np.searchsorted(times, np.asarray(onset, np.int64))
    return _CHORD_ROOT[masks[at]], _CHORD_QUALITY[masks[at]]


def roman_numerals(root: np.ndarray, quality: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index into :data:`ROMAN_NUMERALS` of each chord relative to its key (-1: undefined)."""
    ok = (np.asarray(root) >= 0) & (np.asarray(quality) >= 0) & (np.asarray(keys) >= 0)
    degree = (np.asarray(root) - np.asarray(keys) % 12) % 12
    return np.where(ok, degree * len(_CHORDS) + np.asarray(quality), -1)


def voice_roles(onset: np.ndarray, pitch: np.ndarray, duration: np.ndarray) -> np.ndarray:
    """Index into :data:`VOICE_ROLES` of each note among the notes sounding at its onset."""
    if len(onset) == 0:
        return np.zeros(0, np.int64)
    pitch = np.asarray(pitch, np.int64)
    times, counts = _sounding(onset, duration, pitch, 128)
    at = np.searchsorted(times, np.asarray(onset, np.int64))
    sounding = counts[at] > 0
    n = sounding.sum(axis=1)
    low = np.argmax(sounding, axis=1)
    high = 127 - np.argmax(sounding[:, ::-1], axis=1)
    return np.select([n <= 1, pitch == high, pitch == low], [0, 1, 2], default=3)


def metric_strength(onset: np.ndarray, meters: Sequence[tuple[float, int, int]] | None) -> np.ndarray:
    """Index into :data:`METRIC` of each onset (ticks) under ``meters``: time signatures
    ``(start beat, numerator, denominator)`` in order; -1 without one."""
    onset = np.asarray(onset, np.int64)
    out = np.full(len(onset), -1, np.int64)
    if not meters:
        return out
    starts = [round(b * TICKS) for b, _, _ in meters]
    for k, (_, num, den) in enumerate(meters):
        lo = starts[k]
        hi = starts[k + 1] if k + 1 < len(meters) else np.iinfo(np.int64).max
        sel = (onset >= lo) & (onset < hi)
        if not sel.any() or den <= 0 or num <= 0:
            continue
        bar = num * 4 * TICKS // den
        compound = den >= 8 and num % 3 == 0 and num > 3
        beat = 3 * 4 * TICKS // den if compound else max(1, 4 * TICKS // den)
        n_beats = num // 3 if compound else num
        offset = (onset[sel] - lo) % bar if bar > 0 else np.zeros(sel.sum(), np.int64)
        on_beat = offset % beat == 0
        index = offset // beat
        strong = on_beat & (n_beats % 2 == 0) & (n_beats >= 4) & (index == n_beats // 2)
        out[sel] = np.select([offset == 0, strong, on_beat], [0, 1, 2], default=3)
    return out

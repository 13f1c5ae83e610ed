"""The metre of a converted score: time-signature segments on the song's beat axis.

MMT's notes keep no bar lines, so the dataset builders record, per song, the segments
``(start, numerator, denominator)``: from beat ``start`` on (quarter-note beats, the same
axis as the notes' ``beat`` after the builder's shift to the first note), bars of
``numerator/denominator`` follow each other with a downbeat every bar length. A new
segment starts where the time signature changes or the bar grid breaks (an incomplete
bar before a repeat, a first ending). A pickup bar's segment starts before the music
(a negative ``start``): its downbeat is where the full bar would have begun. The
``metric_strength`` label (:mod:`music_interpret.analyzers.theory`) reads them.
"""

from __future__ import annotations

from typing import Any

Meter = tuple[float, int, int]


def score_meters(score: Any) -> list[Meter]:
    """Segments of a music21 score (after repeat expansion), in quarter notes from its start,
    read from the measures of its first part."""
    parts = list(getattr(score, "parts", []))
    if not parts:
        return []
    segments: list[Meter] = []
    for measure in parts[0].getElementsByClass("Measure"):
        ts = measure.timeSignature or measure.getContextByClass("TimeSignature")
        if ts is None or not ts.numerator or not ts.denominator:
            continue
        num, den = int(ts.numerator), int(ts.denominator)
        downbeat = float(measure.offset) - float(measure.paddingLeft or 0.0)
        if segments:
            start, n0, d0 = segments[-1]
            bars = (downbeat - start) / (n0 * 4.0 / d0)
            if (n0, d0) == (num, den) and abs(bars - round(bars)) < 1e-6:
                continue
        segments.append((round(downbeat, 6), num, den))
    return segments


def shift_meters(meters: list[Meter], beats: float) -> list[list[float | int]]:
    """``meters`` moved ``beats`` earlier (the builders shift songs to their first note's
    beat), as JSON-ready lists."""
    return [[round(start - beats, 6), num, den] for start, num, den in meters]

"""Time-signature segments of scores (for the metric_strength label)."""

from __future__ import annotations

import pytest

from music_interpret.adapters.mmt.meters import score_meters, shift_meters

music21 = pytest.importorskip("music21", reason="music21 reads the scores")


def test_pickup_and_meter_change() -> None:
    s = music21.stream.Score()
    part = music21.stream.Part()
    pickup = music21.stream.Measure(number=0)
    pickup.append(music21.meter.TimeSignature("4/4"))
    pickup.append(music21.note.Note("C4", quarterLength=1))
    pickup.paddingLeft = 3.0
    part.append(pickup)
    full = music21.stream.Measure(number=1)
    full.append(music21.note.Note("D4", quarterLength=4))
    part.append(full)
    waltz = music21.stream.Measure(number=2)
    waltz.append(music21.meter.TimeSignature("3/4"))
    waltz.append(music21.note.Note("E4", quarterLength=3))
    part.append(waltz)
    again = music21.stream.Measure(number=3)
    again.append(music21.note.Note("F4", quarterLength=3))
    part.append(again)
    s.append(part)
    assert score_meters(s) == [(-3.0, 4, 4), (5.0, 3, 4)]
    assert shift_meters(score_meters(s), 1) == [[-4.0, 4, 4], [4.0, 3, 4]]


def test_a_chorale_with_a_pickup() -> None:
    score = music21.corpus.parse("bach/bwv66.6").expandRepeats()
    assert score_meters(score) == [(-3.0, 4, 4)]

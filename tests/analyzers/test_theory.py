"""Music-theory labels and the labels at t+1 (the token the model predicts)."""

from __future__ import annotations

import numpy as np
import pytest

from music_interpret.analyzers import theory
from music_interpret.analyzers.attributes import (
    ATTRIBUTES,
    NA,
    compute_attributes,
    resolve_attributes,
)
from music_interpret.stores.netcdf import TOKEN_COORDS

T = theory.TICKS


def song(notes: list[tuple[int, int, int, int]], *, window: list[int] | None = None,
         header: bool = True, eos: bool = True, song_id: int = 0) -> dict[str, np.ndarray]:
    """Coordinates of one song: notes (beat, position, pitch, duration in ticks) in order."""
    rows = []
    if header:
        rows += [(0, -1, -1, -1, -1, -1), (1, -1, -1, -1, -1, 25), (2, -1, -1, -1, -1, -1)]
    rows += [(3, b, p, pitch, d, 25) for b, p, pitch, d in notes]
    if eos:
        rows += [(4, -1, -1, -1, -1, -1)]
    n = len(rows)
    out = {k: np.full(n, -1) for k in TOKEN_COORDS}
    for i, name in enumerate(("event_type", "beat", "position", "pitch", "duration", "instrument")):
        out[name] = np.array([r[i] for r in rows])
    out["song"] = np.full(n, song_id)
    out["song_token"] = np.arange(n) if header else np.arange(n) + 3
    out["window"] = np.zeros(n, np.int64) if window is None else np.asarray(window)
    out["seq_pos"] = np.arange(n)
    return out


def names(attr: str, codes: np.ndarray) -> list[str]:
    return [ATTRIBUTES[attr].label(int(c)) for c in codes]


def test_next_token_labels_follow_the_model_window() -> None:
    notes = [(0, 0, 60, 12), (1, 0, 62, 12), (1, 6, 64, 6), (3, 0, 65, 24)]
    c = song(notes, window=[0, 0, 0, 0, 0, 1, 1, 1])  # notes 0-1 in window 0, 2-3 in window 1
    a = compute_attributes(c, ["pitch", "next.pitch", "next.event_type", "next.position",
                               "next.beat_step", "beat_step"])
    assert names("next.pitch", a["next.pitch"]) == ["n/a", "n/a", "C4", "D4", "n/a", "F4", "n/a", "n/a"]
    # header tokens predict the next header token / the first note; the window cut is n/a
    assert names("next.event_type", a["next.event_type"]) == [
        "instrument", "start-of-notes", "note", "note", "n/a", "note", "end-of-song", "n/a"]
    assert names("next.position", a["next.position"])[5] == "0"
    # the first note follows start-of-notes; the first note of window 1 has no stored predecessor
    assert names("beat_step", a["beat_step"]) == ["n/a", "n/a", "n/a", "n/a", "1", "n/a", "2", "n/a"]
    assert names("next.beat_step", a["next.beat_step"])[5] == "2"
    assert ATTRIBUTES["next.pitch"].when == "t+1" and ATTRIBUTES["next.pitch"].base == "pitch"
    assert ATTRIBUTES["pitch"].when == "t"


def test_notes_only_store_knows_the_song_end() -> None:
    c = song([(0, 0, 60, 12), (1, 0, 62, 12)], header=False, eos=False)
    a = compute_attributes(c, ["next.event_type", "next.pitch"])
    assert names("next.event_type", a["next.event_type"]) == ["note", "end-of-song"]
    assert names("next.pitch", a["next.pitch"]) == ["D4", "n/a"]


def test_old_neighbour_names_are_aliases() -> None:
    assert resolve_attributes(["next_pitch_class", "interval_from_prev"]) == [
        "voice_next_pitch_class", "voice_interval_from_prev"]


def test_keys_of_scales() -> None:
    c_major = [60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60]
    a_minor = [57, 59, 60, 62, 64, 65, 68, 69, 64, 60, 57]
    for pitches, key in ((c_major, "C major"), (a_minor, "A minor")):
        code = theory.piece_key(np.array(pitches), np.full(len(pitches), 12))
        assert theory.KEYS[code] == key
    assert theory.piece_key(np.array([], np.int64), np.array([], np.int64)) == -1


def test_local_key_follows_a_modulation() -> None:
    c = [60, 64, 67, 65, 62, 71, 72, 67]  # C major
    g = [55, 59, 62, 67, 66, 67, 62, 67]  # G major (F#)
    pitch = np.array(c + g)
    onset = np.arange(len(pitch)) * T  # one note per beat: 8 beats in each key
    keys = theory.local_keys(onset, pitch, np.full(len(pitch), 12))
    assert theory.KEYS[keys[1]] == "C major" and theory.KEYS[keys[-2]] == "G major"
    degrees = theory.scale_degrees(pitch, keys)
    assert theory.DEGREES[degrees[0]] == "1" and theory.DEGREES[degrees[-4]] == "7"  # F# in G


def test_chords_roman_numerals_and_voice_roles() -> None:
    # beat 0: C E G C (C major); beat 1: D F# A C in G major (V7); beat 2: C D (no chord)
    notes = [(0, 48, 12), (0, 64, 12), (0, 67, 12), (0, 72, 12),
             (12, 50, 12), (12, 66, 12), (12, 69, 12), (12, 72, 12),
             (24, 60, 12), (24, 62, 12)]
    onset = np.array([n[0] for n in notes])
    pitch = np.array([n[1] for n in notes])
    dur = np.array([n[2] for n in notes])
    root, quality = theory.chords(onset, pitch, dur)
    assert [theory.PITCH_CLASSES[r] for r in root[:8:4]] == ["C", "D"]
    assert [theory.CHORD_QUALITIES[q] for q in quality[:8:4]] == ["major", "dominant7"]
    assert root[8] == -1 and quality[8] == -1
    g_major = np.full(len(notes), theory.KEYS.index("G major"))
    numerals = theory.roman_numerals(root, quality, g_major)
    assert theory.ROMAN_NUMERALS[numerals[0]] == "IV" and theory.ROMAN_NUMERALS[numerals[4]] == "V7"
    roles = [theory.VOICE_ROLES[r] for r in theory.voice_roles(onset, pitch, dur)]
    assert roles[:4] == ["bass", "inner", "inner", "top"]
    assert theory.VOICE_ROLES[theory.voice_roles(np.array([0]), np.array([60]), np.array([12]))[0]] == "alone"


def test_a_held_note_is_part_of_later_sonorities() -> None:
    # a bass C held for two beats under E-G then F-A: C major, then F major (C is its fifth)
    onset = np.array([0, 0, 0, 12, 12])
    pitch = np.array([48, 64, 67, 65, 69])
    dur = np.array([24, 12, 12, 12, 12])
    root, quality = theory.chords(onset, pitch, dur)
    assert [theory.PITCH_CLASSES[r] for r in root] == ["C", "C", "C", "F", "F"]
    assert theory.CHORD_QUALITIES[quality[3]] == "major"


@pytest.mark.parametrize(("meter", "beats", "expected"), [
    ((4, 4), [0, 1, 2, 3, 4, 0.5], ["downbeat", "beat", "strong", "beat", "downbeat", "offbeat"]),
    ((3, 4), [0, 1, 2, 3, 1.5], ["downbeat", "beat", "beat", "downbeat", "offbeat"]),
    ((6, 8), [0, 0.5, 1.5, 3, 2], ["downbeat", "offbeat", "beat", "downbeat", "offbeat"]),
    ((12, 8), [0, 1.5, 3, 4.5, 6], ["downbeat", "beat", "strong", "beat", "downbeat"]),
])
def test_metric_strength(meter: tuple[int, int], beats: list[float], expected: list[str]) -> None:
    onset = np.round(np.array(beats) * T).astype(np.int64)
    codes = theory.metric_strength(onset, [(0.0, *meter)])
    assert [theory.METRIC[c] for c in codes] == expected


def test_metric_strength_follows_meter_changes_and_pickups() -> None:
    meters = [(-1.0, 4, 4), (7.0, 3, 4)]  # a one-beat pickup, then 4/4 until beat 7, then 3/4
    onset = np.array([0, 3, 7, 10]) * T
    assert [theory.METRIC[c] for c in theory.metric_strength(onset, meters)] == [
        "beat", "downbeat", "downbeat", "downbeat"]
    assert (theory.metric_strength(onset, None) == NA).all()


def test_theory_attributes_through_the_registry() -> None:
    notes = [(0, 0, 48, 12), (0, 0, 64, 12), (0, 0, 67, 12), (1, 0, 50, 12), (1, 0, 65, 12),
             (1, 0, 69, 12)]
    c = song(notes)
    a = compute_attributes(c, ["chord_root", "chord_quality", "voice_role", "metric_strength",
                               "next.chord_root"], meters={0: [(0.0, 4, 4)]})
    assert names("chord_root", a["chord_root"])[3:9] == ["C", "C", "C", "D", "D", "D"]
    assert names("chord_quality", a["chord_quality"])[6] == "minor"
    assert names("voice_role", a["voice_role"])[3:6] == ["bass", "inner", "top"]
    assert names("metric_strength", a["metric_strength"])[3:9] == ["downbeat"] * 3 + ["beat"] * 3
    assert names("next.chord_root", a["next.chord_root"])[5] == "D"
    assert names("chord_root", a["chord_root"])[:3] == ["n/a"] * 3  # header tokens

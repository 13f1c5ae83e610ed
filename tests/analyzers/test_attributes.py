"""Per-token musical attributes derived from store coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from music_interpret.analyzers.attributes import (
    ATTRIBUTES,
    NA,
    UnknownAttribute,
    compute_attributes,
    neighbours,
    resolve_attributes,
)
from music_interpret.errors import UserError
from music_interpret.stores.netcdf import TOKEN_COORDS


def coords(**cols: list[int]) -> dict[str, np.ndarray]:
    n = len(next(iter(cols.values())))
    out = {k: np.full(n, -1) for k in TOKEN_COORDS}
    out.update({k: np.asarray(v) for k, v in cols.items()})
    out.setdefault("song_token", np.arange(n))
    return out


# two songs; song 0 interleaves instruments 25 and 26; the last token is an instrument token
C = coords(
    song=[0, 0, 0, 0, 0, 1, 1, 1],
    event_type=[3, 3, 3, 3, 4, 3, 3, 1],
    instrument=[25, 26, 25, 26, -1, 25, 25, 27],
    pitch=[60, 40, 79, 41, -1, 61, 59, -1],
    beat=[0, 1, 5, 6, -1, 3, 4, -1],
    position=[0, 3, 6, 11, -1, 0, 0, -1],
    duration=[12, 6, 13, 48, -1, 18, 12, -1],
)


def label(name: str, codes: np.ndarray) -> list[str]:
    return [ATTRIBUTES[name].label(int(c)) for c in codes]


def test_note_attributes_and_na() -> None:
    a = compute_attributes(C)
    assert label("pitch_class", a["pitch_class"]) == ["C", "E", "G", "F", "n/a", "C#", "B", "n/a"]
    assert label("pitch", a["pitch"])[:3] == ["C4", "E2", "G5"]
    assert label("octave", a["octave"])[:3] == ["4", "2", "5"]
    assert label("beat_mod4", a["beat_mod4"])[:4] == ["0", "1", "1", "2"]
    assert label("position", a["position"])[:4] == ["0", "3", "6", "11"]
    assert label("duration", a["duration"])[:4] == ["1", "1/2", "1", "4"]  # 13 snaps to 12
    assert label("event_type", a["event_type"])[4] == "end-of-song"
    assert label("instrument", a["instrument"]) == [
        "violin", "viola", "violin", "viola", "n/a", "violin", "violin", "cello"]
    for name in ("pitch", "pitch_class", "octave", "position", "beat_mod4", "duration",
                 "voice_interval_from_prev", "voice_prev_pitch_class"):
        assert a[name][4] == NA and a[name][7] == NA, name
    assert all(v.dtype == np.int16 for v in a.values())


def test_neighbours_stay_inside_song_and_instrument() -> None:
    prev, nxt = neighbours(C)
    assert prev.tolist() == [-1, -1, 0, 1, -1, -1, 5, -1]
    assert nxt.tolist() == [2, 3, -1, -1, -1, 6, -1, -1]
    a = compute_attributes(C, ["voice_interval_from_prev", "voice_interval_to_next", "voice_prev_pitch_class",
                               "voice_next_pitch_class"])
    assert label("voice_interval_from_prev", a["voice_interval_from_prev"])[:7] == [
        "n/a", "n/a", ">=+12", "+1", "n/a", "n/a", "-2"]
    assert label("voice_interval_to_next", a["voice_interval_to_next"])[:7] == [
        ">=+12", "+1", "n/a", "n/a", "n/a", "-2", "n/a"]
    assert label("voice_prev_pitch_class", a["voice_prev_pitch_class"])[:4] == ["n/a", "n/a", "C", "E"]
    assert label("voice_next_pitch_class", a["voice_next_pitch_class"])[:2] == ["G", "F"]


def test_neighbours_follow_song_token_order_not_storage_order() -> None:
    c = coords(song=[0, 0, 0], event_type=[3, 3, 3], instrument=[1, 1, 1], pitch=[60, 64, 62],
               song_token=[2, 0, 1])
    prev, _ = neighbours(c)
    assert prev.tolist() == [2, -1, 1]  # 64 -> 62 -> 60


def test_registry_and_unknown_names() -> None:
    assert resolve_attributes(None) == list(ATTRIBUTES)
    assert resolve_attributes(["octave"]) == ["octave"]
    with pytest.raises(UserError, match="unknown attribute.*'chord'.*known: event_type, pitch"):
        resolve_attributes(["pitch_class", "chord"], "x.attributes")
    with pytest.raises(UnknownAttribute):
        resolve_attributes(["octave", "octave"])
    assert "meter" in ATTRIBUTES["beat_mod4"].doc

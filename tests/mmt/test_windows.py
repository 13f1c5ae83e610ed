"""Song windows: complete coverage, single ownership, model-valid codes, MMT-identical short songs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from music_interpret.adapters.mmt import representation as rep
from music_interpret.adapters.mmt.windows import song_windows, tokenize_song

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mmt" / "data"


@st.composite
def songs(draw):
    n = draw(st.integers(1, 250))
    gaps = draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
    onsets = np.cumsum(gaps)
    programs = draw(st.lists(st.sampled_from([0, 24, 40, 41, 42, 43, 56, 73]), min_size=n, max_size=n))
    notes = np.stack([
        onsets // 12, onsets % 12,
        draw(st.lists(st.integers(21, 108), min_size=n, max_size=n)),
        draw(st.lists(st.integers(1, 96), min_size=n, max_size=n)),
        programs,
    ], axis=1).astype(np.int64)
    return notes[np.lexsort(notes.T[::-1])]


def check_windows(notes, max_seq_len, max_beat, stride=None):
    song = tokenize_song(notes)
    wins = song_windows(song, max_seq_len, max_beat, stride)
    owners = np.zeros(len(song.codes), int)
    for w in wins:
        assert len(w.codes) <= max_seq_len
        assert w.owned.any()
        assert (w.codes[:, 1] <= max_beat).all() and (w.codes[:, 1] >= 0).all()
        np.add.at(owners, w.token[w.owned], 1)
        rows = w.codes[:, 0]
        assert rows[0] == 0 and rows[-1] == 4  # start-of-song ... end-of-song
        notes_in = rows == 3
        # every field but the beat is the song's own code; beat differences are preserved
        src = song.codes[w.token]
        assert (w.codes[:, [0, 2, 3, 4, 5]] == src[:, [0, 2, 3, 4, 5]]).all()
        shift = src[notes_in, 1] - w.codes[notes_in, 1]
        assert len(set(shift.tolist())) <= 1
    assert (owners == 1).all(), "every token is owned by exactly one window"
    return song, wins


@settings(max_examples=40, deadline=None)
@given(songs(), st.integers(16, 200), st.integers(4, 64))
def test_windows_cover_every_token_once(notes, max_seq_len, max_beat):
    check_windows(notes, max_seq_len, max_beat)


@settings(max_examples=30, deadline=None)
@given(songs(), st.integers(1, 50))
def test_windows_with_explicit_stride(notes, stride):
    check_windows(notes, 64, 32, stride)


@pytest.mark.parametrize("name", ["bach/processed/notes/bwv38_6", "quartets/processed/notes/mozart_k155_m3"])
def test_fixture_songs(name):
    notes = np.load(FIXTURES / f"{name}.npy")
    song, wins = check_windows(notes, 1024, 256)
    assert song.dropped == 0 and len(song.notes) == len(notes)
    meta = rep.token_metadata(song.codes)
    note_rows = meta["event_type"] == 3
    assert (meta["beat"][note_rows] == notes[:, 0]).all()  # song-level beats
    if len(notes) + 10 < 1024 and notes[-1, 0] < 256:
        assert len(wins) == 1
        assert (wins[0].codes == rep.encode_song(notes, 256, 1024)).all()  # exactly MMT's input
    else:
        assert len(wins) > 1


def test_long_song_keeps_context_and_shifts_beats():
    notes = np.load(FIXTURES / "quartets/processed/notes/beethoven_op18no1_m3.npy")  # 1017 beats
    song, wins = check_windows(notes, 512, 256)
    for w in wins[1:]:
        first_owned = int(np.flatnonzero(w.owned)[0])
        assert first_owned >= (512 - song.header_len - 1) // 2  # half a window of left context
    assert wins[-1].owned[-1] and wins[-1].codes[-1, 0] == 4


def test_unmapped_programs_are_counted_not_hidden():
    notes = np.array([[0, 0, 60, 12, 40], [1, 0, 62, 12, 128 - 1]], np.int64)
    song = tokenize_song(notes)
    assert len(song.notes) + song.dropped == 2


def test_adapter_windows_and_encoding_check():
    import json

    from music_interpret.adapters.mmt.adapter import MMTAdapter
    from music_interpret.errors import UserError

    root = FIXTURES.parent / "models" / "bach" / "ape-tiny"
    adapter = MMTAdapter()
    adapter.load(root)
    notes = np.load(FIXTURES / "quartets/processed/notes/beethoven_op18no1_m3.npy")
    song, wins = adapter.windows(notes)
    assert all(len(w.codes) <= adapter.max_seq_len for w in wins) and len(wins) > 2
    encoding = json.loads((FIXTURES / "bach/processed/notes/encoding.json").read_text())
    adapter.check_encoding(encoding, "encoding.json")
    encoding["n_tokens"][3] = 200
    with pytest.raises(UserError, match="encoding.json: pitch vocabulary 200 does not match"):
        adapter.check_encoding(encoding, "encoding.json")

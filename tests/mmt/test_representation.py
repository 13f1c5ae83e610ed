"""MMT encoding: encoding.json, encode/decode round trips and token metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from music_interpret.adapters.mmt import representation as rep
from music_interpret.errors import UserError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mmt"
NOTES_DIRS = [FIXTURES / "data" / ds / "processed" / "notes" for ds in ("bach", "quartets")]
REPRESENTATIVE = sorted(rep.INSTRUMENT_PROGRAM_MAP.values())


def test_encoding_json_is_byte_identical():
    for notes_dir in NOTES_DIRS:
        text = (notes_dir / "encoding.json").read_text()
        assert json.dumps(rep.get_encoding()) == text


def test_encoding_tables():
    enc = rep.get_encoding()
    assert enc["n_tokens"] == [5, 1026, 13, 129, 33, 65]
    assert enc["duration_code_map"][13] == 12  # nearest known duration 12 (not 15)
    assert enc["duration_code_map"][0] == 1 and enc["duration_code_map"][384] == 32
    assert enc["instrument_code_map"]["violin"] == 25
    assert enc["program_instrument_map"][110] == "violin"
    assert len(rep.INSTRUMENT_NAMES) == 65 and rep.INSTRUMENT_NAMES[28] == "contrabass"


def _mmt_expected(notes: np.ndarray) -> np.ndarray:
    """What MMT's decode(encode(notes)) gives: snapped durations, representative programs."""
    inst = rep.PROGRAM_TO_INSTRUMENT[notes[:, 4]]
    keep = (notes[:, 0] <= rep.MAX_BEAT) & (inst > 0)
    out = notes[keep].copy()
    out[:, 3] = rep.CODE_TO_DURATION[rep.DURATION_TO_CODE[np.minimum(out[:, 3], 384)]]
    out[:, 4] = rep.INSTRUMENT_TO_PROGRAM[inst[keep]]
    return out


@pytest.mark.parametrize(
    "path", sorted(p for d in NOTES_DIRS for p in d.glob("*.npy")), ids=lambda p: p.stem
)
def test_fixture_songs_round_trip(path):
    notes = np.load(path)
    codes = rep.encode_notes(notes)
    assert np.array_equal(rep.decode_notes(codes), _mmt_expected(notes))


def test_greedy_notes_reference():
    ref = np.load(FIXTURES / "reference" / "ape-tiny-generate.npz")
    codes = np.concatenate([ref["prompt"][0], ref["greedy"][0]])
    assert np.array_equal(rep.decode_notes(codes), ref["greedy_notes"])


def _notes(program_strategy, duration_strategy, beat_max=rep.MAX_BEAT):
    row = st.tuples(
        st.integers(0, beat_max),
        st.integers(0, 11),
        st.integers(0, 127),
        duration_strategy,
        program_strategy,
    )
    return st.lists(row, max_size=40).map(
        lambda rows: np.array(sorted(set(rows)), dtype=np.int64).reshape(-1, 5)
    )


@settings(max_examples=150, deadline=None)
@given(_notes(st.sampled_from(REPRESENTATIVE), st.sampled_from(rep.KNOWN_DURATIONS)))
def test_round_trip_exact_for_representable_notes(notes):
    codes = rep.encode_notes(notes)
    assert codes.dtype == np.int64 and codes.shape == (
        len(notes) + 3 + len(np.unique(notes[:, 4])),
        6,
    )
    assert np.array_equal(rep.decode_notes(codes), notes)


@settings(max_examples=150, deadline=None)
@given(_notes(st.integers(0, 127), st.integers(0, 1000), beat_max=1100))
def test_encode_structure_and_lossy_round_trip(notes):
    codes = rep.encode_notes(notes)
    types = codes[:, 0]
    assert types[0] == rep.SOS and types[-1] == rep.EOS
    n_inst = int((types == rep.INSTRUMENT).sum())
    assert np.all(types[1 : 1 + n_inst] == rep.INSTRUMENT)
    inst_codes = codes[1 : 1 + n_inst, 5]
    assert np.all(np.diff(inst_codes) > 0)  # distinct, sorted by code
    assert types[1 + n_inst] == rep.SON and np.all(types[2 + n_inst : -1] == rep.NOTE)
    assert not codes[types != rep.NOTE][:, 1:5].any()
    assert np.array_equal(rep.decode_notes(codes), _mmt_expected(notes))
    rep.check_codes(codes)  # every code inside the vocabulary


@settings(max_examples=100, deadline=None)
@given(_notes(st.integers(0, 127), st.integers(0, 400)))
def test_metadata_consistent_with_decoding(notes):
    codes = rep.encode_notes(notes)
    meta = rep.token_metadata(codes)
    assert set(meta) == {
        "event_type",
        "beat",
        "position",
        "pitch",
        "duration",
        "instrument",
        "program",
        "instrument_name",
    }
    assert all(len(v) == len(codes) for v in meta.values())
    assert meta["event_type"].dtype == np.int8
    assert np.array_equal(meta["event_type"], codes[:, 0])
    is_note = codes[:, 0] == rep.NOTE
    decoded = np.stack([meta[k][is_note] for k in rep.NOTE_FIELDS], axis=1).reshape(-1, 5)
    assert np.array_equal(decoded, rep.decode_notes(codes))
    for key in ("beat", "position", "pitch", "duration"):
        assert np.all(meta[key][~is_note] == -1)
    is_inst = codes[:, 0] == rep.INSTRUMENT
    has = is_note | is_inst
    assert np.array_equal(meta["instrument"][has], codes[has, 5])
    assert np.all(meta["instrument"][~has] == -1) and np.all(meta["program"][~has] == -1)
    assert np.array_equal(meta["program"][has], rep.INSTRUMENT_TO_PROGRAM[codes[has, 5]])
    names = [rep.INSTRUMENT_NAMES[c] for c in codes[has, 5]]
    assert list(meta["instrument_name"][has]) == names
    assert np.all(meta["instrument_name"][~has] == "")


def test_encode_song_trims_like_mmt_dataset():
    notes = np.array([[0, 0, 60, 12, 0], [3, 0, 62, 12, 40], [5, 0, 64, 12, 0]])
    codes = rep.encode_song(notes, max_beat=4)
    # the viola note at beat 5 is gone, and so is its instrument row
    assert np.array_equal(rep.decode_notes(codes), notes[:2])
    assert list(codes[codes[:, 0] == rep.INSTRUMENT, 5]) == [1, 25]
    cut = rep.encode_song(notes, max_seq_len=5)
    full = rep.encode_notes(notes)
    assert len(cut) == 5 and np.array_equal(cut[:4], full[:4]) and cut[-1, 0] == rep.EOS


def test_empty_song():
    codes = rep.encode_notes(np.zeros((0, 5), dtype=np.int64))
    assert codes[:, 0].tolist() == [rep.SOS, rep.SON, rep.EOS]
    assert rep.decode_notes(codes).shape == (0, 5)


@pytest.mark.parametrize(
    "notes, word",
    [
        (np.zeros((3, 4), dtype=np.int64), "shape"),
        (np.zeros((2, 5)), "integer"),
        (np.array([[0, 12, 60, 12, 0]]), "position=12"),
        (np.array([[0, 0, 128, 12, 0]]), "pitch=128"),
        (np.array([[-1, 0, 60, 12, 0]]), "beat=-1"),
        (np.array([[0, 0, 60, 12, 128]]), "program=128"),
    ],
)
def test_bad_notes_raise_user_error(notes, word):
    with pytest.raises(UserError, match=word):
        rep.encode_notes(notes)


def test_bad_codes_raise_user_error():
    with pytest.raises(UserError, match="pitch code 129"):
        rep.token_metadata(np.array([[3, 1, 1, 129, 1, 1]]))
    with pytest.raises(UserError, match="no duration"):
        rep.decode_notes(np.array([[3, 1, 1, 5, 0, 1]]))
    with pytest.raises(UserError, match="shape"):
        rep.decode_notes(np.zeros((4, 5), dtype=np.int64))

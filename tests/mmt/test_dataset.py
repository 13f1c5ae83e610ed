"""Tests for reading MMT note datasets and for the code windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from music_interpret.adapters.mmt.dataset import (
    CSV_HEADER,
    NoteDataset,
    _load_plain_npy,
    open_dataset,
    owned_ranges,
    read_notes,
    validate_notes,
    windows,
)
from music_interpret.errors import UserError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mmt" / "data"
BACH = FIXTURES / "bach" / "processed"
QUARTETS = FIXTURES / "quartets" / "processed"


def _lines(path: Path) -> list[str]:
    return path.read_text().split()


def _one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("root", [BACH, QUARTETS], ids=["bach", "quartets"])
def test_processed_layout_all_songs(root: Path) -> None:
    ds = open_dataset(root)
    assert isinstance(ds, NoteDataset)
    assert ds.root == root and ds.notes_dir == root / "notes"
    assert ds.split is None
    assert list(ds) == _lines(root / "names.txt")
    assert len(ds) == len(_lines(root / "names.txt"))
    assert ds.encoding_path == root / "notes" / "encoding.json"
    assert ds.load_encoding()["resolution"] == 12
    assert ds.sources is None


def test_notes_dir_resolves_to_same_dataset() -> None:
    via_notes = open_dataset(BACH / "notes", split="test")
    via_root = open_dataset(BACH, split="test")
    assert via_notes.root == BACH and via_notes.names == via_root.names


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_splits_follow_lists(split: str) -> None:
    ds = open_dataset(BACH, split=split)
    assert ds.split == split
    assert list(ds) == _lines(BACH / f"{split}-names.txt")
    assert open_dataset(BACH, split="all").names == open_dataset(BACH).names


def test_bach_split_sizes_and_partition() -> None:
    sizes = {s: len(open_dataset(BACH, split=s)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 18, "valid": 3, "test": 3}
    union = set().union(*(open_dataset(BACH, split=s).names for s in sizes))
    assert union == set(open_dataset(BACH).names)


def test_read_matches_readme_counts() -> None:
    ds = open_dataset(BACH)
    notes = ds.read("bwv269")
    assert notes.dtype == np.int64 and notes.shape == (302, 5)
    assert notes[:, 0].max() + 1 == 83  # beats
    assert set(notes[:, 4]) == {40, 41, 42, 43}
    quartet = open_dataset(QUARTETS).read("mozart_k155_m3")
    assert quartet.shape == (1086, 5) and set(quartet[:, 4]) == {40, 41, 42}


@pytest.mark.parametrize("root", [BACH, QUARTETS], ids=["bach", "quartets"])
def test_csv_equals_npy_for_every_fixture_song(root: Path) -> None:
    for name in open_dataset(root):
        from_npy = read_notes(root / "notes" / f"{name}.npy")
        from_csv = read_notes(root / "notes" / f"{name}.csv")
        np.testing.assert_array_equal(from_npy, from_csv)


def test_items_yields_names_and_arrays() -> None:
    ds = open_dataset(BACH, split="valid")
    items = list(ds.items())
    assert [name for name, _ in items] == list(ds.names)
    assert all(a.shape[1] == 5 for _, a in items)


def test_seed_layout_lists_in_notes_dir_and_sources(tmp_path: Path) -> None:
    notes = tmp_path / "bach_notes" / "notes"
    notes.mkdir(parents=True)
    for name in ("bwv269", "bwv347", "bwv65_2"):
        shutil.copy(BACH / "notes" / f"{name}.npy", notes)
    (notes / "names.txt").write_text("bwv347\nbwv269\nbwv65_2\n")
    (notes / "train-names.txt").write_text("bwv347\nbwv65_2\n")
    (notes / "sources.json").write_text(json.dumps({"songs": {"bwv269": {}}}))
    for given_path in (tmp_path / "bach_notes", notes):
        ds = open_dataset(given_path)
        assert ds.root == tmp_path / "bach_notes" and ds.notes_dir == notes
        assert ds.names == ("bwv347", "bwv269", "bwv65_2")
        assert ds.sources == {"songs": {"bwv269": {}}}
        assert open_dataset(given_path, split="train").names == ("bwv347", "bwv65_2")


def test_seed_layout_lists_in_parent(tmp_path: Path) -> None:
    notes = tmp_path / "x_notes" / "notes"
    notes.mkdir(parents=True)
    shutil.copy(BACH / "notes" / "bwv269.npy", notes)
    (tmp_path / "x_notes" / "test-names.txt").write_text("bwv269\n")
    assert open_dataset(notes, split="test").names == ("bwv269",)


def test_no_name_list_scans_folder_sorted_npy_preferred(tmp_path: Path) -> None:
    shutil.copy(BACH / "notes" / "bwv347.csv", tmp_path)
    shutil.copy(BACH / "notes" / "bwv269.npy", tmp_path)
    shutil.copy(BACH / "notes" / "bwv269.csv", tmp_path)
    shutil.copy(BACH / "notes" / "encoding.json", tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.root == tmp_path and ds.notes_dir == tmp_path
    assert ds.names == ("bwv269", "bwv347")
    assert ds.path("bwv269").suffix == ".npy" and ds.path("bwv347").suffix == ".csv"
    np.testing.assert_array_equal(ds.read("bwv347"), read_notes(BACH / "notes" / "bwv347.npy"))


# --------------------------------------------------------------------------- errors


def test_missing_split_list_names_file(tmp_path: Path) -> None:
    shutil.copy(BACH / "notes" / "bwv269.npy", tmp_path)
    with pytest.raises(UserError) as exc:
        open_dataset(tmp_path, split="valid")
    assert "valid-names.txt" in _one_line(exc)


def test_unknown_split_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown split 'dev'"):
        open_dataset(BACH, split="dev")
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nope")


def test_empty_dataset_names_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        open_dataset(tmp_path)
    assert str(tmp_path) in _one_line(exc) and "no songs" in str(exc.value)


def test_listed_song_without_file(tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("ghost\n")
    with pytest.raises(UserError) as exc:
        open_dataset(tmp_path)
    message = _one_line(exc)
    assert "'ghost'" in message and str(tmp_path) in message


def test_duplicate_and_unsafe_names(tmp_path: Path) -> None:
    shutil.copy(BACH / "notes" / "bwv269.npy", tmp_path)
    (tmp_path / "names.txt").write_text("bwv269\nbwv269\n")
    with pytest.raises(UserError, match="listed twice"):
        open_dataset(tmp_path)
    (tmp_path / "names.txt").write_text("../bwv269\n")
    with pytest.raises(UserError, match="names.txt:1"):
        open_dataset(tmp_path)


def test_unknown_song_in_read() -> None:
    with pytest.raises(UserError, match="'bwv269' is not in dataset"):
        open_dataset(BACH, split="test").read("bwv269")


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((3, 4), dtype=np.int64), "shape (N, 5)"),
        (np.zeros((5,), dtype=np.int64), "shape (N, 5)"),
        (np.zeros((2, 3, 5), dtype=np.int64), "shape (N, 5)"),
        (np.full((2, 5), 0.5), "not whole numbers"),
        (np.array([[0, 0, 60, 12, np.nan]]), "not whole numbers"),
        (np.array([["a"] * 5]), "not an integer type"),
        (np.array([[0, 0, 60, -1, 40]]), "negative duration -1 in row 0"),
        (np.array([[0, 0, 128, 1, 40]]), "pitch 128 in row 0"),
        (np.array([[0, 0, 60, 1, 200]]), "program 200 in row 0"),
    ],
)
def test_bad_npy_contents(tmp_path: Path, array: np.ndarray, fragment: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(UserError) as exc:
        read_notes(path)
    message = _one_line(exc)
    assert fragment in message and str(path) in message


def test_whole_float_and_int32_arrays_are_accepted() -> None:
    ref = read_notes(BACH / "notes" / "bwv65_2.npy")
    for converted in (ref.astype(np.float64), ref.astype(np.int32), ref.astype(np.uint16)):
        out = validate_notes(converted)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, ref)


def test_unreadable_npy(tmp_path: Path) -> None:
    path = tmp_path / "broken.npy"
    path.write_bytes(b"this is not numpy")
    with pytest.raises(UserError) as exc:
        read_notes(path)
    assert "cannot read notes file" in _one_line(exc) and str(path) in str(exc.value)
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read notes file"):
        read_notes(pickled)


@pytest.mark.parametrize("dtype", ["<i8", "<i4", "<u2", "u1", ">i8", "<f8"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_fast_path_matches_np_load(tmp_path: Path, dtype: str, order: str) -> None:
    """Plain C-order integer files take the quick reader; others go through np.load: same notes."""
    ref = read_notes(BACH / "notes" / "bwv65_2.npy")
    path = tmp_path / "song.npy"
    np.save(path, np.asarray(ref.astype(dtype), order=order))
    quick = _load_plain_npy(path)
    assert (quick is not None) == (dtype in ("<i8", "<i4", "<u2", "u1") and order == "C")
    if quick is not None:
        assert quick.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(quick, np.load(path))
    np.testing.assert_array_equal(read_notes(path), ref)
    np.save(path, np.zeros((0, 5), np.int64))
    assert read_notes(path).shape == (0, 5)


def test_truncated_npy_names_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.npy"
    np.save(path, np.ones((40, 5), np.int64))
    path.write_bytes(path.read_bytes()[:-3])
    assert _load_plain_npy(path) is None
    with pytest.raises(UserError) as exc:
        read_notes(path)
    assert "cannot read notes file" in _one_line(exc) and str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("beat,pos,pitch,duration,program\n0,0,60,12,40\n", "header must be"),
        ("", "header must be"),
        (f"{CSV_HEADER}\n0,0,60,12\n", ":2: expected 5 values"),
        (f"{CSV_HEADER}\n0,0,60,12,40\n0,0,x,1,40\n", ":3: non-integer value"),
        (f"{CSV_HEADER}\n0,-3,60,12,40\n", "negative position -3"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        read_notes(path)
    message = _one_line(exc)
    assert fragment in message and str(path) in message


def test_bad_file_in_dataset_names_it(tmp_path: Path) -> None:
    np.save(tmp_path / "song.npy", np.zeros((4, 4), dtype=np.int64))
    ds = open_dataset(tmp_path)
    with pytest.raises(UserError, match="song.npy"):
        ds.read("song")


def test_bad_json_sources(tmp_path: Path) -> None:
    shutil.copy(BACH / "notes" / "bwv269.npy", tmp_path)
    (tmp_path / "sources.json").write_text("{not json")
    with pytest.raises(UserError) as exc:
        open_dataset(tmp_path)
    assert "sources.json" in _one_line(exc)


# --------------------------------------------------------------------------- windows


def test_windows_examples() -> None:
    assert windows(0, 8) == []
    assert windows(5, 8) == [(0, 5)]
    assert windows(8, 8) == [(0, 8)]
    assert windows(9, 8) == [(0, 8), (1, 9)]
    assert windows(20, 8) == [(0, 8), (4, 12), (8, 16), (12, 20)]
    assert windows(21, 8) == [(0, 8), (4, 12), (8, 16), (12, 20), (13, 21)]
    assert windows(20, 8, stride=8) == [(0, 8), (8, 16), (12, 20)]
    assert owned_ranges(21, 8) == [(0, 8), (8, 12), (12, 16), (16, 20), (20, 21)]
    assert windows(3, 1) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize(("args", "name"), [((-1, 8), "n_codes"), ((5, 0), "max_seq_len")])
def test_windows_bad_arguments(args: tuple[int, int], name: str) -> None:
    with pytest.raises(UserError, match=name):
        windows(*args)


@pytest.mark.parametrize("stride", [0, 9])
def test_windows_bad_stride(stride: int) -> None:
    with pytest.raises(UserError, match="stride"):
        windows(30, 8, stride)


@st.composite
def _window_args(draw: st.DrawFn) -> tuple[int, int, int | None]:
    max_seq_len = draw(st.integers(1, 64))
    n_codes = draw(st.integers(0, 400))
    stride = draw(st.one_of(st.none(), st.integers(1, max_seq_len)))
    return n_codes, max_seq_len, stride


@given(_window_args())
def test_windows_cover_everything_within_length(args: tuple[int, int, int | None]) -> None:
    n_codes, max_seq_len, stride = args
    spans = windows(n_codes, max_seq_len, stride)
    covered = np.zeros(n_codes, dtype=bool)
    for start, end in spans:
        assert 0 <= start < end <= n_codes
        assert end - start == min(max_seq_len, n_codes)
        covered[start:end] = True
    assert covered.all()
    assert [s for s, _ in spans] == sorted({s for s, _ in spans})  # strictly increasing
    if n_codes <= max_seq_len:
        assert spans == ([(0, n_codes)] if n_codes else [])


@given(_window_args())
def test_owned_ranges_partition_and_maximise_left_context(
    args: tuple[int, int, int | None],
) -> None:
    n_codes, max_seq_len, stride = args
    spans = windows(n_codes, max_seq_len, stride)
    owned = owned_ranges(n_codes, max_seq_len, stride)
    assert len(owned) == len(spans)
    counts = np.zeros(n_codes, dtype=int)
    for (start, end), (own_start, own_end) in zip(spans, owned, strict=True):
        assert start <= own_start <= own_end <= end
        counts[own_start:own_end] += 1
    assert (counts == 1).all()
    # each code's owner is the containing window whose start is smallest (most left context)
    for k, (own_start, own_end) in enumerate(owned):
        for i in (own_start, own_end - 1) if own_end > own_start else ():
            first = min(j for j, (s, e) in enumerate(spans) if s <= i < e)
            assert first == k
    if stride is None and len(spans) > 1:
        for (start, _), (own_start, _) in zip(spans[1:], owned[1:], strict=True):
            assert own_start - start >= max_seq_len - max(1, max_seq_len // 2)

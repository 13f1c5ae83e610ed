"""Tests for the offline demo-data builder (music21 corpus -> MMT notes files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("music21", reason="the demo-data builder needs the [demo] extra")
from music21 import chord, note, stream  # noqa: E402

from music_interpret.adapters.mmt import demo_data  # noqa: E402
from music_interpret.adapters.mmt.dataset import open_dataset, read_notes  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mmt" / "data"
BACH_NOTES = FIXTURES / "bach" / "processed" / "notes"
FIRST_THREE = ("bwv269", "bwv347", "bwv153_1")  # chorales.Iterator() order


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    assert demo_data.main(["--out", str(out), "--limit", "3"]) == 0
    return out / "bach_notes"


def test_layout_and_names(built: Path) -> None:
    notes = built / "notes"
    expected = {f"{n}.{ext}" for n in FIRST_THREE for ext in ("npy", "csv")}
    expected |= {"encoding.json", "names.txt", "sources.json"}
    expected |= {f"{s}-names.txt" for s in ("train", "valid", "test")}
    assert {p.name for p in notes.iterdir()} == expected
    assert (notes / "names.txt").read_text() == "".join(f"{n}\n" for n in FIRST_THREE)
    assert [p.name for p in built.parent.iterdir()] == ["bach_notes"]  # no temp dirs left


def test_output_is_byte_identical_to_mmt_fixture(built: Path) -> None:
    for name in FIRST_THREE:
        for ext in ("npy", "csv"):
            ours = (built / "notes" / f"{name}.{ext}").read_bytes()
            assert ours == (BACH_NOTES / f"{name}.{ext}").read_bytes(), f"{name}.{ext}"
    encoding = (built / "notes" / "encoding.json").read_bytes()
    assert encoding == (BACH_NOTES / "encoding.json").read_bytes()


def test_dataset_reader_opens_output_with_splits(built: Path) -> None:
    ds = open_dataset(built)
    assert ds.names == FIRST_THREE and ds.notes_dir == built / "notes"
    split_sets = [set(open_dataset(built, split=s).names) for s in ("train", "valid", "test")]
    assert [len(s) for s in split_sets] == [1, 1, 1]
    assert set().union(*split_sets) == set(FIRST_THREE)
    assert ds.sources is not None and set(ds.sources["songs"]) == set(FIRST_THREE)


def test_provenance(built: Path) -> None:
    import music21

    sources = json.loads((built / "notes" / "sources.json").read_text())
    assert sources["music21_version"] == music21.__version__
    song = sources["songs"]["bwv153_1"]
    assert song["corpus_path"] == "bach/bwv153.1.mxl"
    assert song["music21_version"] == music21.__version__
    assert [(p["part"], p["program"]) for p in song["parts"]] == [
        ("Soprano", 40), ("Alto", 41), ("Tenor", 42), ("Bass", 43),
    ]  # fmt: skip
    for name in FIRST_THREE:
        arr = read_notes(built / "notes" / f"{name}.npy")
        assert sources["songs"][name]["notes"] == len(arr)
        assert sources["songs"][name]["beats"] == int(arr[-1, 0]) + 1
    splits = {s: (built / "notes" / f"{s}-names.txt").read_text().split() for s in demo_data.SPLITS}
    assert all(name in splits[info["split"]] for name, info in sources["songs"].items())


def test_rebuild_is_deterministic_and_replaces(built: Path, tmp_path: Path) -> None:
    assert demo_data.main(["--out", str(tmp_path), "--limit", "3"]) == 0
    first = _files(tmp_path / "bach_notes")
    assert first == _files(built)
    (tmp_path / "bach_notes" / "notes" / "stale.txt").write_text("old")
    assert demo_data.main(["--out", str(tmp_path), "--limit", "3"]) == 0
    assert _files(tmp_path / "bach_notes") == first
    assert [p.name for p in tmp_path.iterdir()] == ["bach_notes"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--dataset-name", "Bad.Name", "--limit", "1"], "dataset name 'Bad.Name'"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_data.main(["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err
    assert list(tmp_path.iterdir()) == []


def test_module_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "music_interpret.adapters.mmt.demo_data", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--quartets" in result.stdout


# --------------------------------------------------------------------------- conversion units


def _part(name: str, *elements: note.GeneralNote) -> stream.Part:
    part = stream.Part()
    part.partName = name
    for element in elements:
        part.append(element)
    return part


def test_score_notes_ties_chords_graces_rests_triplets() -> None:
    tied_a = note.Note("C4", quarterLength=1.0)
    tied_b = note.Note("C4", quarterLength=0.5)
    tied_a.tie, tied_b.tie = note.tie.Tie("start"), note.tie.Tie("stop")
    grace = note.Note("D4").getGrace()
    triplet = note.Note("E4", quarterLength=1 / 3)
    part = _part(
        "Soprano",
        tied_a, tied_b, note.Rest(quarterLength=0.5), grace,
        chord.Chord(["G4", "B4"], quarterLength=2.0), triplet,
    )  # fmt: skip
    score = stream.Score([part])
    notes, end_tick = demo_data.score_notes(score, [40])
    expected = [
        (0, 0, 60, 18, 40),  # tie merged: 1.5 quarters
        (2, 0, 67, 24, 40),  # chord split into two notes, after the rest; grace dropped
        (2, 0, 71, 24, 40),
        (4, 0, 64, 4, 40),  # triplet eighth: 1/3 quarter = 4 ticks
    ]
    assert notes.tolist() == [list(row) for row in expected]
    assert end_tick == 4 * 12 + 4


def test_mmt_filter_rules() -> None:
    rows = np.array([[b, 6, 60, 12, 40] for b in range(3, 53)], dtype=np.int64)
    kept, reason = demo_data.mmt_filter(rows, end_tick=53 * 12)
    assert reason == "" and kept is not None
    assert kept[0, 0] == 0 and kept[0, 1] == 6  # beat shifted, position kept
    assert demo_data.mmt_filter(rows, end_tick=40 * 12 - 1)[1] == "shorter than 40 beats"
    assert demo_data.mmt_filter(rows, end_tick=8000 * 12 + 1)[1] == "longer than 8000 beats"
    assert demo_data.mmt_filter(rows[:49], end_tick=60 * 12)[1] == "fewer than 50 notes"


def test_split_names_is_deterministic_partition() -> None:
    names = [f"s{i}" for i in range(307)]
    splits = demo_data.split_names(names, seed=0)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [245, 31, 31]
    assert sorted(sum(splits.values(), ())) == sorted(names)
    assert splits == demo_data.split_names(names, seed=0)
    assert splits != demo_data.split_names(names, seed=1)
    assert list(splits["valid"]) == [n for n in names if n in set(splits["valid"])]
    assert demo_data.split_names(["a", "b"]) == {"train": ("a", "b"), "valid": (), "test": ()}


def test_song_names_and_programs() -> None:
    assert demo_data.song_name("bach/bwv248.12-2.mxl") == "bwv248_12-2"
    assert demo_data.song_name("haydn/opus1no1/movement1.mxl") == "haydn_op1no1_m1"
    assert demo_data.song_name("mozart/k155/movement3.mxl") == "mozart_k155_m3"
    assert demo_data.chorale_programs(["Soprano", "Alto", "Tenor", "Bass"]) == [40, 41, 42, 43]
    assert demo_data.chorale_programs(["Soprano", "Alto", "Tenor", "Bass", "Continuo"]) is None
    names = ["1st Violin", "2nd Violin", "Viola", "Violoncello"]
    assert demo_data.quartet_programs(names) == [40, 40, 41, 42]
    assert demo_data.quartet_programs(["Violin I", "Viola", "Cello", "Piano"]) is None


def test_quartet_movement_matches_fixture_except_grace_notes() -> None:
    path = demo_data.corpus_root() / "haydn" / "opus1no1" / "movement1.mxl"
    song, reason = demo_data.convert(path, "haydn_op1no1_m1", demo_data.quartet_programs)
    assert reason == "" and song is not None
    ref = read_notes(FIXTURES / "quartets" / "processed" / "notes" / "haydn_op1no1_m1.npy")
    ours, theirs = set(map(tuple, song.notes.tolist())), set(map(tuple, ref.tolist()))
    assert ours < theirs
    # muspy keeps the 2 written grace notes (eighths, duration 6), played twice by the repeat
    assert sorted(theirs - ours) == [
        (167, 0, 72, 6, 41), (167, 0, 75, 6, 40), (281, 0, 72, 6, 41), (281, 0, 75, 6, 40),
    ]  # fmt: skip


@pytest.mark.slow
def test_all_fixture_chorales_are_identical() -> None:
    """All 24 fixture chorales (made by MMT via muspy) are reproduced exactly (~4 s)."""
    names = (FIXTURES / "bach" / "processed" / "names.txt").read_text().split()
    for name in names:
        rel = f"bach/{name.replace('_', '.')}.mxl"
        song, reason = demo_data.convert(
            demo_data.corpus_root() / rel, name, demo_data.chorale_programs
        )
        assert song is not None, f"{rel}: {reason}"
        np.testing.assert_array_equal(song.notes, read_notes(BACH_NOTES / f"{name}.npy"))

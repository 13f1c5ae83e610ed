"""Tests for the ``--corpus all`` build (music21's whole bundled corpus -> MMT notes)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from music_interpret.adapters.mmt import corpus, corpus_build, corpus_programs, demo_data, pool
from music_interpret.adapters.mmt.corpus import Task
from music_interpret.adapters.mmt.corpus_programs import PartInfo
from music_interpret.adapters.mmt.dataset import open_dataset, read_notes
from music_interpret.errors import UserError

# one abc opus (2 reels with chord symbols), one krn (+ the krn twin of an mxl), two mxl
REAL = [
    "nottingham-dataset/reelsa-c.abc",
    "palestrina/Agnus_01.krn",
    "bach/bwv277.*",
    "bach/bwv153.1.mxl",
]
EXPECTED_NAMES = [
    "bach_bwv153_1",
    "bach_bwv277",
    "nottingham-dataset_reelsa-c-80",
    "nottingham-dataset_reelsa-c-81",
    "palestrina_agnus_01",
]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _build(out: Path, workers: int, *extra: str) -> int:
    include = [arg for pattern in REAL for arg in ("--include", pattern)]
    argv = ["--corpus", "all", "--out", str(out), "--workers", str(workers), *include, *extra]
    return demo_data.main(argv)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    assert _build(out, 1) == 0
    return out / "music21_notes"


def test_real_files_of_each_format(built: Path) -> None:
    ds = open_dataset(built)
    assert list(ds.names) == EXPECTED_NAMES
    sources = json.loads((built / "notes" / "sources.json").read_text())
    assert sources["generator"] == corpus_build.GENERATOR
    songs = sources["songs"]
    assert songs["nottingham-dataset_reelsa-c-80"]["tune"] == "80"
    assert songs["palestrina_agnus_01"]["corpus_path"] == "palestrina/Agnus_01.krn"
    assert [(p["part"], p["program"]) for p in songs["bach_bwv277"]["parts"]] == [
        ("Soprano", 40), ("Alto", 41), ("Tenor", 42), ("Bass", 43),
    ]  # fmt: skip
    assert {p["rule"] for p in songs["nottingham-dataset_reelsa-c-81"]["parts"]} == {"melody"}
    # every song records its metre on its own beat axis (bwv277 opens with a one-beat pickup)
    assert all(songs[name]["meters"] for name in EXPECTED_NAMES)
    assert songs["bach_bwv277"]["meters"][0][1:] == [4, 4]
    skipped = {(s["corpus_path"], s["category"]) for s in sources["skipped"]}
    assert skipped == {("bach/bwv277.krn", "twin")}
    for name in EXPECTED_NAMES:
        notes = ds.read(name)
        assert songs[name]["notes"] == len(notes) and notes[0, 0] == 0
        assert songs[name]["tokens"] == len(corpus.representation.encode_notes(notes))
    reel = ds.read("nottingham-dataset_reelsa-c-80")
    assert (reel[:, 3] > 1).all()  # no chord symbols (they would be zero-length notes)
    stats = json.loads((built / "corpus_stats.json").read_text())
    assert stats["total"]["songs"] == 5
    assert stats["total"]["tokens"] == sum(s["tokens"] for s in songs.values())
    assert stats["subcorpora"]["bach"]["instruments"] == ["violin", "viola", "cello", "contrabass"]
    assert [p.name for p in built.parent.iterdir()] == ["music21_notes"]  # no temp dirs left


def test_chorale_equals_demo_conversion(built: Path) -> None:
    song, _ = demo_data.convert(
        demo_data.corpus_root() / "bach/bwv153.1.mxl", "bwv153_1", demo_data.chorale_programs
    )
    assert song is not None
    np.testing.assert_array_equal(read_notes(built / "notes" / "bach_bwv153_1.npy"), song.notes)


def test_two_workers_give_identical_bytes(built: Path, tmp_path: Path) -> None:
    assert _build(tmp_path, 2) == 0
    assert _files(tmp_path / "music21_notes") == _files(built)
    assert _build(tmp_path, 2) == 0  # a previous build of this command is replaced
    assert _files(tmp_path / "music21_notes") == _files(built)


def test_refuses_a_folder_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "music21_notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert _build(tmp_path, 1) == 2
    assert "is not a previous build" in capsys.readouterr().err
    assert _files(foreign) == {"mine.txt": b"keep"}
    demo = tmp_path / "bach_notes" / "notes"  # the demo's own build is foreign here too
    demo.mkdir(parents=True)
    (demo / "sources.json").write_text(json.dumps({"generator": demo_data.GENERATOR}))
    assert _build(tmp_path, 1, "--dataset-name", "bach") == 2
    demo_argv = ["--out", str(tmp_path), "--limit", "1", "--dataset-name", "music21"]
    assert demo_data.main(demo_argv) == 2  # the demo refuses foreign folders too
    assert _files(foreign) == {"mine.txt": b"keep"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bach_notes", "music21_notes"]


def test_broken_files_are_recorded_and_do_not_stop_the_build(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bach").mkdir(parents=True)
    shutil.copy(demo_data.corpus_root() / "bach" / "bwv153.1.mxl", root / "bach")
    (root / "bach" / "broken.mxl").write_bytes(b"this is not a zip file")
    (root / "folk").mkdir()
    (root / "folk" / "tiny.abc").write_text("X:1\nT:tiny\nM:4/4\nL:1/4\nK:C\nCDEF|\n")
    (root / "folk" / "notes.txt").write_text("not a score")
    out = tmp_path / "out"
    argv = ["--corpus", "all", "--corpus-root", str(root), "--out", str(out), "--workers", "2"]
    assert demo_data.main(argv) == 0
    sources = json.loads((out / "music21_notes" / "notes" / "sources.json").read_text())
    assert list(sources["songs"]) == ["bach_bwv153_1"]
    skipped = {s["corpus_path"]: s["category"] for s in sources["skipped"]}
    assert skipped == {
        "bach/broken.mxl": "parse-error", "folk/notes.txt": "format", "folk/tiny.abc": "too-short",
    }  # fmt: skip


def test_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--corpus", "all", "--out", str(tmp_path)]
    assert demo_data.main([*base, "--limit", "3"]) == 2
    assert demo_data.main([*base, "--include", "nothing/*.abc"]) == 2
    assert demo_data.main([*base, "--workers", "0"]) == 2
    assert capsys.readouterr().err.count("error:") == 3
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- pool


def test_pool_time_limits_and_crash_do_not_stop_the_others() -> None:
    # builtins.eval pickles by reference, so spawned workers can run these expressions
    tasks = ["1 + 1", "sum(range(10**12))", "2 + 2", "__import__('time').sleep(60)",
             "__import__('os')._exit(3)", "1 / 0", "3 + 3"]  # fmt: skip
    # a task's wall clock also counts the start of a replacement worker (spawn, imports),
    # which takes seconds on a loaded machine: 10 s leaves room for it (4 s failed under
    # make test beside a training run)
    started = time.monotonic()
    outcomes, stats = pool.run_tasks(eval, tasks, corpus_build.classify, workers=2,
                                     time_limit=1.0, wall_limit=10.0)  # fmt: skip
    assert time.monotonic() - started < 40
    assert [o.value for o in outcomes if o.ok] == [2, 4, 6]
    errors = [o.error for o in outcomes if not o.ok]
    assert [category for category, _ in errors] == ["timeout", "timeout", "crash", "error"]
    assert "CPU time" in errors[0][1] and "wall clock" in errors[1][1]
    assert errors[3][1].startswith("ZeroDivisionError")
    assert stats.timeouts == 2 and stats.crashes == 1 and stats.worker_peak_rss_mib > 0


# --------------------------------------------------------------------------- units


def test_file_selection_and_abc_split(tmp_path: Path) -> None:
    for rel in ("a/x.mxl", "a/x.krn", "a/y.mus", "a/y.xml", "demos/z.xml", "a/w.rntxt", "top.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "a" / "t.abc").write_text("% header\nX:1\nT:one\nK:C\nC\nX: 7\nT:two\nK:C\nD\n")
    tasks, skips = corpus.corpus_tasks(tmp_path)
    assert [t.label for t in tasks] == ["a/t.abc X:1", "a/t.abc X:7", "a/x.mxl", "a/y.xml"]
    assert tasks[1].text == "% header\nX: 7\nT:two\nK:C\nD\n"
    assert {s.corpus_path: s.category for s in skips} == {
        "a/w.rntxt": "format", "a/x.krn": "twin", "a/y.mus": "format", "demos/z.xml": "excluded",
    }  # fmt: skip
    assert corpus.split_abc("T:no number\nK:C\nC\n") == [(None, "T:no number\nK:C\nC\n")]


def test_program_rules() -> None:
    def programs(*parts: PartInfo, vocal: bool = False) -> list[tuple[int, str]]:
        return corpus_programs.assign_programs(parts, vocal)

    names = ["Violin I", "Violino II.", "Viola", "Violoncello.", "Violone e Organo", "Continuo",
             "Cantus II", "Altus", "Tenor 1", "Bassus", "Canto", "Basso", "Electric Piano",
             "Piano", "Oboe 3", "Trumpet 1", "Horn 2", "Timpani", "Tenor Sax", "Cornet 1"]
    expected = [40, 40, 41, 42, 43, 19, 40, 41, 42, 43, 40, 43, 4, 0, 68, 56, 60, 47, 66, 56]
    assert [corpus_programs.name_program(n) for n in names] == [(True, p) for p in expected]
    assert corpus_programs.name_program("Contratenor") == (True, None)  # voice of unknown range
    assert corpus_programs.name_program("MusicXML Part") == (False, None)
    low, high = PartInfo("Quintus", mean_pitch=50.0), PartInfo("Voice", mean_pitch=70.0)
    assert programs(low, high) == [(43, "range"), (40, "range")]
    # the name wins over a placeholder program; then instrument name, midi, melody, range
    assert programs(PartInfo("Violin I", "String Ensemble 1", 48)) == [(40, "name")]
    assert programs(PartInfo("P1", "Grand Piano", 0), PartInfo(""))[0] == (0, "instrument")
    assert programs(PartInfo("", "", 52)) == [(52, "midi")]
    assert programs(PartInfo("", staff=True), PartInfo("", staff=True)) == [(0, "staff")] * 2
    assert [corpus_programs.name_program(n)[1] for n in ("Klarinette", "Flöte", "Trompete", "Alt")] == [
        71, 73, 56, 41,
    ]  # fmt: skip
    assert corpus_programs.name_program("Gesang") == (True, None)
    assert programs(PartInfo("", "", 120)) == [(40, "melody")]  # 120: not an MMT instrument
    assert programs(PartInfo("", mean_pitch=60), PartInfo("", mean_pitch=45)) == [
        (41, "range"), (43, "range"),
    ]  # fmt: skip
    assert programs(PartInfo("MusicXML Part", "Tenor Sax", 66, 55.0), vocal=True) == [
        (42, "range")
    ]


@pytest.mark.parametrize(
    ("body", "played", "implied"),
    [
        ("CDEF|CDEF:|GABc|GABc:|", "CDEF CDEF CDEF CDEF GABC GABC GABC GABC", 1),
        ("|:CDEF|CDEF:||:GABc|GABc:|", "CDEF CDEF CDEF CDEF GABC GABC GABC GABC", 0),
        ("|:CDEF|[1 CDEF:|[2 EDCz||GABc|GABc:|", "CDEF CDEF CDEF EDC GABC GABC GABC GABC", 1),
        ("CDEF|[1 CDEF:|[2 EDCz|GABc|[1 GABc:|[2 cBAG|]", "CDEF CDEF CDEF EDC GABC GABC GABC CBAG",
         1),
    ],
)  # fmt: skip
def test_bare_end_repeats_go_back_to_the_previous_one(body: str, played: str, implied: int) -> None:
    music21 = demo_data._music21()
    score = music21.converter.parseData(f"X:1\nM:2/4\nL:1/8\nK:C\n{body}\n", format="abc")
    assert len(corpus.imply_repeat_starts(score)) == implied
    notes = score.expandRepeats().flatten().notes
    assert "".join(n.name for n in notes) == played.replace(" ", "")


def test_melody_key_ignores_transposition_and_note_values() -> None:
    rng = np.random.default_rng(0)
    pitches = rng.integers(60, 72, 30)
    notes = np.array([[i, 0, p, 12, 40] for i, p in enumerate(pitches)])
    moved = notes.copy()
    moved[:, 2] += 5
    moved[:, 0] = np.arange(30) * 2  # half-speed notation
    assert corpus.melody_key(notes) == corpus.melody_key(moved) is not None
    assert corpus.melody_key(notes[:10]) is None
    other = notes.copy()
    other[3, 2] += 1
    assert corpus.melody_key(other) != corpus.melody_key(notes)


def _task(path: str, tune: str | None = None, work: str | None = None) -> Task:
    return Task(path.split("/")[0], path, path, "score", tune=tune, work=work)


def test_names_groups_and_splits() -> None:
    assert corpus_build.base_name(_task("essenFolksong/Han 1.abc", "0490")) == (
        "essenfolksong_han_1-0490"
    )
    taken: set[str] = set()
    assert [corpus_build._unique("a", taken) for _ in range(3)] == ["a", "a-2", "a-3"]
    names = [f"s{i}" for i in range(307)]
    singles = {n: n for n in names}
    assert corpus_build.split_by_group(names, singles) == demo_data.split_names(names)
    grouped = {n: ("g" if i % 10 == 0 else n) for i, n in enumerate(names)}
    splits = corpus_build.split_by_group(names, grouped, seed=3)
    held = [s for s in ("train", "valid", "test") if "s0" in splits[s]][0]
    assert all(f"s{i}" in splits[held] for i in range(0, 307, 10))
    assert sorted(sum(splits.values(), ())) == sorted(names)


def test_split_groups_join_work_and_melody() -> None:
    def song(name: str, work: str | None, shift: int) -> corpus_build.CorpusSong:
        notes = np.array([[i, 0, 60 + (i * 7) % 12 + shift, 12, 40] for i in range(30)])
        converted = corpus.Converted(notes, (("", 40, "melody"),), "expanded")
        return corpus_build.CorpusSong(name, _task(f"x/{name}.abc", work=work), converted, 33)

    a, b, c = song("a", "w", 0), song("b", "w", 100), song("c", None, 3)  # c: a transposed
    b.notes[:, 2] = np.arange(30) % 5 + 40  # another melody, same work as a
    assert corpus_build.split_groups([a, b, c]) == {"a": "a", "b": "a", "c": "a"}


def test_check_replaceable(tmp_path: Path) -> None:
    target = tmp_path / "d_notes"
    corpus_build.check_replaceable(target, "gen")  # absent: fine
    (target / "notes").mkdir(parents=True)
    with pytest.raises(UserError, match="not a previous build"):
        corpus_build.check_replaceable(target, "gen")
    (target / "notes" / "sources.json").write_text('{"generator": "gen"}')
    corpus_build.check_replaceable(target, "gen")
    with pytest.raises(UserError):
        corpus_build.check_replaceable(target, "other")

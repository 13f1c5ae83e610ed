"""Importing users' own MIDI/MusicXML as an MMT dataset (``adapters/mmt/import_notes.py``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import mido
import numpy as np
import pytest

from music_interpret.adapters.mmt.dataset import open_dataset
from music_interpret.adapters.mmt.import_notes import import_files, main, mmt_split
from tests.conftest import FIXTURES, REPO, run_cli

PPQ = 480  # rescaled to 12 per beat: one MMT tick is 40 MIDI ticks
OFFSET = 2 * PPQ  # the music starts at beat 2: the import shifts it to 0
BEAT = PPQ


def _track(events: list[tuple[int, mido.Message | mido.MetaMessage]]) -> mido.MidiTrack:
    """A track from (absolute tick, message) pairs (stable order for equal ticks)."""
    track = mido.MidiTrack()
    now = 0
    for tick, msg in sorted(events, key=lambda e: e[0]):
        track.append(msg.copy(time=tick - now))
        now = tick
    return track


def _note(events: list, channel: int, pitch: int, on: int, off: int) -> None:
    events.append((OFFSET + on, mido.Message("note_on", channel=channel, note=pitch, velocity=80)))
    events.append((OFFSET + off, mido.Message("note_off", channel=channel, note=pitch)))


def write_song(path: Path) -> np.ndarray:
    """A type-1 MIDI file exercising every rule; returns the rows MMT would extract."""
    meta = [(0, mido.MetaMessage("track_name", name="conductor")),
            (0, mido.MetaMessage("set_tempo", tempo=500000)),
            (0, mido.MetaMessage("time_signature", numerator=4, denominator=4)),
            (8 * BEAT, mido.MetaMessage("time_signature", numerator=4, denominator=4)),  # same, on the grid
            (12 * BEAT, mido.MetaMessage("set_tempo", tempo=400000)),
            (34 * BEAT, mido.MetaMessage("time_signature", numerator=3, denominator=4))]
    violin = [(0, mido.MetaMessage("track_name", name="violin")),
              (0, mido.Message("program_change", channel=0, program=40))]
    expected = []
    for i in range(48):  # a quarter-note line: beats 0..47
        _note(violin, 0, 60 + i % 12, i * BEAT, (i + 1) * BEAT)
        expected.append((i, 0, 60 + i % 12, 12, 40))
    # overlapping notes of one pitch: note-offs close the earliest open note (muspy's fifo)
    violin += [(OFFSET, mido.Message("note_on", channel=0, note=50, velocity=80)),
               (OFFSET + BEAT // 2, mido.Message("note_on", channel=0, note=50, velocity=70)),
               (OFFSET + BEAT, mido.Message("note_on", channel=0, note=50, velocity=0)),
               (OFFSET + 2 * BEAT, mido.Message("note_off", channel=0, note=50))]
    expected += [(0, 0, 50, 12, 40), (0, 6, 50, 18, 40)]
    other = [(0, mido.MetaMessage("track_name", name="mixed")),
             (0, mido.Message("program_change", channel=1, program=73)),
             (0, mido.Message("program_change", channel=2, program=40)),
             (0, mido.Message("program_change", channel=3, program=120)),  # not in MMT's table
             (0, mido.Message("program_change", channel=4, program=24))]
    for i in range(0, 48, 4):  # flute sixteenths at position 6
        _note(other, 1, 72, i * BEAT + 240, i * BEAT + 360)
        expected.append((i, 6, 72, 3, 73))
    _note(other, 2, 60, 0, BEAT)  # same row as the violin's first note (other track): one row
    _note(other, 1, 80, 20, 40)  # 0.5 tick -> round() to even: onset 0, duration 0 -> 1
    expected.append((0, 0, 80, 1, 73))
    _note(other, 1, 81, 60, 160)  # onset 1.5 -> 2, duration 2.5 -> 2
    expected.append((0, 2, 81, 2, 73))
    _note(other, 1, 90, 10 * BEAT, 10 * BEAT)  # zero length -> duration 1
    expected.append((10, 0, 90, 1, 73))
    _note(other, 3, 70, 5 * BEAT, 6 * BEAT)  # program 120: dropped
    _note(other, 4, 64, 20 * BEAT, 21 * BEAT)  # program changes while it sounds: the new one counts
    other.append((OFFSET + 20 * BEAT + 240, mido.Message("program_change", channel=4, program=25)))
    expected.append((20, 0, 64, 12, 25))
    drums = [(0, mido.MetaMessage("track_name", name="drums"))]
    for i in range(60):
        _note(drums, 9, 36, i * BEAT, i * BEAT + 120)  # channel 10: dropped, beyond beat 48
    midi = mido.MidiFile(type=1, ticks_per_beat=PPQ)
    midi.tracks += [_track(meta), _track(violin), _track(other), _track(drums)]
    midi.save(path)
    return np.array(sorted(set(expected)), dtype=np.int64)


def write_musicxml(path: Path) -> np.ndarray:
    """A two-part score made by music21; returns its expected rows."""
    music21 = pytest.importorskip("music21")
    score = music21.stream.Score()
    expected = []
    for name, program, base in (("Violin", 40, 67), ("Violoncello", 42, 43)):
        part = music21.stream.Part()
        part.partName = name
        part.append(music21.meter.TimeSignature("3/4"))
        tick = 0
        for i in range(42):  # 0.5 and 1.5 quarter notes in turn: some cross a bar line (ties)
            duration = 18 if i % 2 else 6
            part.append(music21.note.Note(base + i % 5, quarterLength=duration / 12))
            expected.append((*divmod(tick, 12), base + i % 5, duration, program))
            tick += duration
        score.insert(0, part)
    score.write("musicxml", fp=str(path))
    return np.array(sorted(expected), dtype=np.int64)


def test_midi_rows_follow_mmt(tmp_path):
    expected = write_song(tmp_path / "My Song.v2.mid")
    final, songs, _, _ = import_files([tmp_path], tmp_path / "out", "mine")
    assert [s.name for s in songs] == ["my_song_v2"]
    notes = np.load(final / "notes" / "my_song_v2.npy")
    assert notes.dtype == np.int64
    np.testing.assert_array_equal(notes, expected)
    sources = json.loads((final / "notes" / "sources.json").read_text())
    song = sources["songs"]["my_song_v2"]
    assert song["ppq"] == PPQ and song["format"] == "midi" and song["notes"] == len(expected)
    assert song["meters"] == [[-2.0, 4, 4], [32.0, 3, 4]]
    assert song["source"] == str((tmp_path / "My Song.v2.mid").resolve())
    dropped = {p["program"]: p["dropped"] for p in song["parts"] if "dropped" in p}
    assert set(dropped) == {0, 120} and "drums" in dropped[0]
    assert open_dataset(final).read("my_song_v2").shape == expected.shape
    assert (final / "notes" / "my_song_v2.csv").read_text().startswith("beat,position,pitch")


def test_musicxml_and_midi_together(tmp_path):
    expected = write_musicxml(tmp_path / "duet.musicxml")
    write_song(tmp_path / "duet.mid")
    assert main([str(tmp_path / "duet.mid"), str(tmp_path / "duet.musicxml"),
                 "--out", str(tmp_path / "out")]) == 0
    final = tmp_path / "out" / "imported_notes"
    np.testing.assert_array_equal(np.load(final / "notes" / "duet_2.npy"), expected)
    sources = json.loads((final / "notes" / "sources.json").read_text())
    song = sources["songs"]["duet_2"]
    assert song["format"] == "musicxml" and song["meters"] == [[0.0, 3, 4]]
    assert [(p["part"], p["program"]) for p in song["parts"]] == [("Violin", 40), ("Violoncello", 42)]
    assert (final / "notes" / "names.txt").read_text().split() == ["duet", "duet_2"]


def test_split_is_mmts(tmp_path):
    for ds, fraction in (("bach", 0.125), ("quartets", 0.34)):
        processed = FIXTURES / "mmt" / "data" / ds / "processed"
        names = (processed / "names.txt").read_text().split()
        split = mmt_split(names, fraction, fraction, 0)
        for part in ("train", "valid", "test"):
            assert list(split[part]) == (processed / f"{part}-names.txt").read_text().split()


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(n in err for n in needles), err


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    _one_line_error(capsys, [str(tmp_path / "broken.mid"), "--out", str(out)], "broken.mid", "not a readable")
    empty = mido.MidiFile(ticks_per_beat=PPQ)
    empty.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)]))
    empty.save(tmp_path / "empty.mid")
    _one_line_error(capsys, [str(tmp_path / "empty.mid"), "--out", str(out)], "empty.mid", "no notes")
    drums = mido.MidiFile(ticks_per_beat=PPQ)
    drums.tracks.append(_track([(i * PPQ, mido.Message("note_on", channel=9, note=36)) for i in range(80)]))
    drums.save(tmp_path / "drums.mid")
    _one_line_error(capsys, [str(tmp_path / "drums.mid"), "--out", str(out)], "drums.mid", "80 notes on drums")
    short = mido.MidiFile(ticks_per_beat=PPQ)
    short.tracks.append(_track([(i * PPQ, mido.Message("note_on", note=60 + i % 3)) for i in range(30)]))
    short.save(tmp_path / "short.mid")
    _one_line_error(capsys, [str(tmp_path / "short.mid"), "--out", str(out)], "short.mid", "shorter than 40 beats")
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(capsys, [str(tmp_path / "notes.txt"), "--out", str(out)], "notes.txt", "unsupported")
    _one_line_error(capsys, [str(tmp_path / "song.mid"), "--out", str(out)], "song.mid", "no such file")
    _one_line_error(capsys, [str(tmp_path / "short.mid"), "--out", str(out), "--test-fraction", "1.5"],
                    "--test-fraction")  # checked before any file is read
    assert not out.exists()


def test_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_song(tmp_path / "in" / "a.mid")
    foreign = tmp_path / "out" / "imported_notes"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    _one_line_error(capsys, [str(tmp_path / "in"), "--out", str(tmp_path / "out")], "imported_notes")
    assert (foreign / "keep.txt").read_text() == "mine"
    argv = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--dataset-name", "again"]
    assert main(argv) == 0 and main(argv) == 0  # its own previous build is replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["again_notes", "imported_notes"]


def test_extract_runs_on_an_imported_dataset(tmp_path):
    (tmp_path / "in").mkdir()
    write_song(tmp_path / "in" / "song.mid")
    final, _, _, _ = import_files([tmp_path / "in"], tmp_path / "data")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        run: mine
        output_dir: {tmp_path / 'reports'}
        stages: [extract]
        device: cpu
        model: {{path: {REPO / 'models' / 'bach' / 'demo'}}}
        data: {{path: {final}}}
        extract: {{layers: [0], output: {tmp_path / 'acts'}}}
    """))
    result = run_cli("run", str(pipeline))
    assert result.returncode == 0, result.stderr
    import music_interpret as mi

    ds = mi.open_activations(tmp_path / "acts")
    assert list(ds.song_name.values) == ["song"]
    notes = np.load(final / "notes" / "song.npy")
    note_tokens = ds.where(ds.event_type == 3, drop=True)
    np.testing.assert_array_equal(note_tokens.pitch.values, notes[:, 2])
    np.testing.assert_array_equal(note_tokens.beat.values, notes[:, 0])


def test_midi_matches_muspy_when_installed(tmp_path):
    """MMT's own route (muspy.read, adjust_resolution, extract_notes) gives the same rows."""
    muspy = pytest.importorskip("muspy")
    music21 = pytest.importorskip("music21")
    from music_interpret.adapters.mmt.import_songs import convert_midi
    from music_interpret.adapters.mmt.representation import PROGRAM_INSTRUMENT_MAP

    write_song(tmp_path / "song.mid")
    music21.corpus.parse("bach/bwv269").write("midi", fp=str(tmp_path / "bwv269.mid"))
    for name in ("song.mid", "bwv269.mid"):
        music = muspy.read(tmp_path / name)
        music.adjust_resolution(12)  # MMT's convert_lmd.adjust_resolution
        for track in music:
            for note in track:
                note.duration = note.duration or 1
        music.remove_duplicate()
        rows = sorted({(n.time // 12, n.time % 12, n.pitch, n.duration, t.program)
                       for t in music if not t.is_drum and PROGRAM_INSTRUMENT_MAP[t.program] for n in t})
        notes, end_tick, _, _, _ = convert_midi(tmp_path / name)
        np.testing.assert_array_equal(notes, np.array(rows, dtype=np.int64))
        assert end_tick == music.get_end_time()


def _bad_files(folder: Path) -> None:
    """An unreadable file, one of drums only and one too short for MMT's filter."""
    (folder / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    drums = mido.MidiFile(ticks_per_beat=PPQ)
    drums.tracks.append(_track([(i * PPQ, mido.Message("note_on", channel=9, note=36)) for i in range(80)]))
    drums.save(folder / "drums.mid")
    short = mido.MidiFile(ticks_per_beat=PPQ)
    short.tracks.append(_track([(i * PPQ, mido.Message("note_on", note=60 + i % 3)) for i in range(30)]))
    short.save(folder / "short.mid")


def test_a_bad_file_is_reported_not_fatal(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    expected = write_song(src / "good.mid")
    _bad_files(src)
    assert main([str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 songs" in out and "3 file(s) refused" in out and "import_report.json" in out
    final = tmp_path / "out" / "imported_notes"
    np.testing.assert_array_equal(np.load(final / "notes" / "good.npy"), expected)
    assert (final / "notes" / "names.txt").read_text().split() == ["good"]
    report = json.loads((final / "import_report.json").read_text())
    assert (report["files"], report["converted"], report["refused"]) == (4, 1, 3)
    assert report["counts"] == {"no-notes": 1, "too-short": 1, "unreadable": 1}
    status = {Path(s["source"]).name: s for s in report["statuses"]}
    assert status["good.mid"] == {"source": str(src / "good.mid"), "song": "good", "status": "converted"}
    assert status["broken.mid"]["status"] == "refused" and "not a readable" in status["broken.mid"]["reason"]
    assert "shorter than 40 beats" in status["short.mid"]["reason"]


def test_strict_stops_at_the_first_bad_file(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_song(src / "good.mid")
    _bad_files(src)
    _one_line_error(capsys, [str(src), "--out", str(tmp_path / "out"), "--strict", "--workers", "1"],
                    "broken.mid", "not a readable")  # the first in file order
    assert not (tmp_path / "out").exists()


def test_no_file_converted_is_one_line(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _bad_files(src)
    _one_line_error(capsys, [str(src), "--out", str(tmp_path / "out"), "--workers", "1"],
                    "none of the 3 files", "unreadable 1", "broken.mid")
    _one_line_error(capsys, [str(src), "--out", str(tmp_path / "out"), "--workers", "0"], "--workers")
    assert not (tmp_path / "out").exists()


def test_output_is_the_same_for_any_worker_count(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_song(src / "a.mid")
    write_song(src / "b.mid")
    _bad_files(src)
    one = import_files([src], tmp_path / "one", workers=1).folder
    two = import_files([src], tmp_path / "two", workers=2).folder
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel

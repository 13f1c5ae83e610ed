"""``data.format: midi|musicxml|auto``: a folder of the user's files as the pipeline's data
(``music_interpret/datainput.py``, ``adapters/mmt/data_import.py``)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from music_interpret.config import load_pipeline
from music_interpret.datainput import import_data
from music_interpret.plugins import get_registry
from tests.conftest import REPO, run_cli
from tests.mmt.test_import_notes import write_song

DEMO_NOTES = REPO / "data" / "base" / "bach_notes" / "notes"
DEMO_MODEL = REPO / "models" / "bach" / "demo"
#: chorales with a pickup of 2 and 3 beats, in 3/4 and 4/4
CHORALES = ("bwv269", "bwv347", "bwv153_1", "bwv86_6")
#: music21 instruments of the demo build's programs (Soprano..Bass -> 40..43)
INSTRUMENTS = {40: "Violin", 41: "Viola", 42: "Violoncello", 43: "Contrabass"}


def write_chorales(folder: Path, names: tuple[str, ...] = CHORALES) -> None:
    """The demo data's sources (music21's corpus) written as MIDI by music21, each part with
    the instrument of its demo program."""
    music21 = pytest.importorskip("music21")
    songs = json.loads((DEMO_NOTES / "sources.json").read_text())["songs"]
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        info = songs[name]
        score = music21.corpus.parse(info["corpus_path"])
        for part, spec in zip(score.parts, info["parts"], strict=True):
            for old in list(part.recurse().getElementsByClass(music21.instrument.Instrument)):
                old.activeSite.remove(old)
            part.insert(0, getattr(music21.instrument, INSTRUMENTS[spec["program"]])())
        score.write("midi", fp=str(folder / f"{name}.mid"))


def pipeline_file(tmp_path: Path, data: str, body: str = "stages: [extract]\n") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""
        run: mine
        output_dir: {tmp_path / 'reports'}
        device: cpu
        model: {{path: {DEMO_MODEL}}}
        data: {data}
        extract: {{layers: [0], output: {tmp_path / 'acts'}}}
    """) + body)
    return path


def converted(tmp_path: Path, data: str) -> Path:
    """The dataset the run makes of ``data`` (converted as :class:`Engine` does)."""
    registry = get_registry()
    pipeline = load_pipeline(pipeline_file(tmp_path, data), registry)
    import_data(pipeline, registry)
    return pipeline.header.data.path


def test_corpus_chorales_round_trip_through_midi(tmp_path):
    """music21's MIDI of a chorale converts to exactly the demo build's notes (from the
    MusicXML). Of the 307 demo chorales 304 match; bwv299, bwv315 and bwv36.4-2 do not
    (overlapping notes of one pitch in a part, and an ornament one tick apart, read back
    differently from MIDI), so they are not in this test."""
    write_chorales(tmp_path / "midi")
    folder = converted(tmp_path, f"{{path: {tmp_path / 'midi'}, format: midi}}")
    assert folder == tmp_path / "reports" / "mine" / "imported" / "midi_notes"
    assert sorted((folder / "notes" / "names.txt").read_text().split()) == sorted(CHORALES)
    for name in CHORALES:
        np.testing.assert_array_equal(np.load(folder / "notes" / f"{name}.npy"),
                                      np.load(DEMO_NOTES / f"{name}.npy"), err_msg=name)
    report = json.loads((folder / "import_report.json").read_text())
    assert report["converted"] == len(CHORALES) and report["refused"] == 0


def test_conversion_is_reused_replaced_or_refused(tmp_path, capsys):
    src = tmp_path / "midi"
    src.mkdir()
    write_song(src / "a.mid")
    data = f"{{path: {src}, format: auto}}"
    folder = converted(tmp_path, data)
    marker = folder / ".import.json"
    stamp = marker.stat().st_mtime_ns
    assert converted(tmp_path, data) == folder and marker.stat().st_mtime_ns == stamp
    assert "(unchanged), reused" in capsys.readouterr().err
    write_song(src / "b.mid")  # the folder changed: converted again
    assert converted(tmp_path, data) == folder
    assert (folder / "notes" / "names.txt").read_text().split() == ["a", "b"]
    # a file rewritten in place with its size and modification time put back: its change
    # time still moved, so the hash cache reads it again and the conversion is redone
    stamp, before = marker.stat().st_mtime_ns, (src / "b.mid").stat()
    body = bytearray((src / "b.mid").read_bytes())
    body[-5] ^= 1  # a note's velocity byte (the file stays a valid MIDI file)
    (src / "b.mid").write_bytes(bytes(body))
    os.utime(src / "b.mid", ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    assert converted(tmp_path, data) == folder and marker.stat().st_mtime_ns != stamp
    assert "(unchanged), reused" not in capsys.readouterr().err
    (marker).unlink()  # no marker: not ours to replace
    (src / "c.mid").write_bytes((src / "a.mid").read_bytes())
    result = run_cli("run", str(pipeline_file(tmp_path, data)))
    assert result.returncode == 2 and "refusing to replace" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_auto_takes_a_notes_dataset_as_it_is(tmp_path):
    assert converted(tmp_path, f"{{path: {DEMO_NOTES.parent}, format: auto}}") == DEMO_NOTES.parent
    assert not (tmp_path / "reports").exists()


def test_validate_names_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    empty = tmp_path / "empty"
    cases = [(f"{{path: {tmp_path}, format: mid}}", "data.format: expected one of", "did you mean 'midi'"),
             (f"{{path: {empty}, format: midi}}", "data.path: ", "no .mid/.midi files"),
             (f"{{path: {empty}, format: auto}}", "data.path: ", "neither an MMT notes dataset")]
    for data, *needles in cases:
        result = run_cli("validate", str(pipeline_file(tmp_path, data)))
        err = result.stderr.strip()
        assert result.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(n in err for n in needles), err


def test_pipeline_on_a_midi_folder_to_xarray_and_saelens(tmp_path):
    """Done when: MIDI files -> extract, preprocess, train -> ``xr.open_mfdataset`` -> SAELens export."""
    xr = pytest.importorskip("xarray")
    write_chorales(tmp_path / "midi", CHORALES[:3])
    pipeline = pipeline_file(tmp_path, f"{{path: {tmp_path / 'midi'}, format: midi}}", textwrap.dedent("""
        stages: [extract, preprocess, train]
        train:
          learner: {name: relu_l1, d_sae: 64, lr: 0.003, batch_size: 256}
          steps: 10
          downstream: 'off'
    """))
    result = run_cli("run", str(pipeline), timeout=300)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "reports" / "mine" / "imported" / "midi_notes"
    shards = sorted((tmp_path / "acts").glob("shard-*.nc"))
    ds = xr.open_mfdataset(shards)  # default arguments
    assert ds.attrs["data_path"] == str(folder)
    assert ds.token.dtype == np.int64 and np.array_equal(ds.token.values, np.arange(ds.sizes["token"]))
    assert {"song", "event_type", "beat", "position", "pitch", "duration", "program"} <= set(ds.coords)
    names = xr.open_dataset(tmp_path / "acts" / "songs.nc").song_name.values
    coords = ds.reset_coords()[["song", "event_type", "beat", "position", "pitch", "duration",
                                "program"]].load()
    note = coords.event_type.values == 3
    for index, name in enumerate(names):  # every note token is the converted MIDI's note
        rows = np.load(folder / "notes" / f"{name}.npy")
        mine = note & (coords.song.values == index)
        tokens = np.stack([coords[k].values[mine] for k in
                           ("beat", "position", "pitch", "duration", "program")], axis=1)
        np.testing.assert_array_equal(tokens, rows, err_msg=str(name))
    dictionary = next((tmp_path / "reports" / "mine" / "train").rglob("weights.safetensors")).parent
    export = run_cli("export", str(dictionary), "--format", "saelens", "--out", str(tmp_path / "sae"))
    assert export.returncode == 0, export.stderr
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_sae"] == 64 and (tmp_path / "sae" / "sparsity.safetensors").exists()
    from tests.learners.test_export_interop import PYTHON, SAELENS, run_in_env

    if PYTHON.exists():  # SAELens itself, in its own environment
        x = np.random.default_rng(0).normal(size=(4, cfg["d_in"])).astype(np.float32)
        info, _, _ = run_in_env(SAELENS, tmp_path / "sae", x, tmp_path)
        assert info["hook_name"] == cfg["metadata"]["hook_name"] and not info["legacy"]

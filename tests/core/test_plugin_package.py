"""The bundled third-party package under plugins/ is found through its entry point."""

from __future__ import annotations

import json
import textwrap

import numpy as np

from music_interpret.catalogue import load_catalogue
from music_interpret.plugins import PluginRegistry
from tests.conftest import REPO, run_cli


def test_notestats_discovered_through_entry_point():
    rows = json.loads(run_cli("plugins", "--json").stdout)
    row = next(r for r in rows if r["name"] == "note_stats")
    assert row["distribution"] == "music-interpret-notestats"
    assert row["entry_point"] == "note_stats" and row["kind"] == "stage" and row["status"] == "loaded"


def test_notestats_not_loaded_when_autoload_disabled():
    rows = json.loads(run_cli("plugins", "--json",
                              env={"MUSIC_INTERPRET_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout)
    assert "note_stats" not in {r["name"] for r in rows}


def test_notestats_stage_counts_the_fixture_notes(tmp_path, fixtures_dir):
    data = fixtures_dir / "mmt" / "data" / "bach" / "processed"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        run: stats
        output_dir: {tmp_path / 'out'}
        stages: [note_stats]
        data: {{path: {data}, split: train}}
        note_stats: {{context: 256}}
    """))
    result = run_cli("run", str(pipeline))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "stats" / "note_stats"
    summary = json.loads((out / "note_stats.json").read_text())
    names = (data / "train-names.txt").read_text().split()
    notes = [np.load(data / "notes" / f"{n}.npy") for n in names]
    assert summary["songs"] == len(names) == 18
    assert summary["notes"] == sum(len(n) for n in notes)
    assert summary["tokens"] == sum(len(n) + 4 + 3 for n in notes)  # four voices = four instruments
    assert set(summary["notes_per_program"]) == {"40", "41", "42", "43"}
    assert summary["pitch_range"][0] == min(int(n[:, 2].min()) for n in notes)
    import xarray as xr

    with xr.open_dataset(out / "note_stats.nc") as ds:
        assert int(ds.pitch_count.sum()) == summary["notes"]
        assert list(ds.song.values) == names


def test_catalogue_lists_every_installed_builtin_and_the_template():
    entries = {(e["kind"], e["name"]) for e in load_catalogue(REPO / "registry" / "plugins.yaml")}
    registry = PluginRegistry()
    for info in registry.infos:
        if info.status == "loaded" and info.distribution in ("music-interpret", "music-interpret-notestats",
                                                                 "music-interpret-hf-remi"):
            assert (info.kind, info.name) in entries


def test_registry_command(tmp_path):
    result = run_cli("registry", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["note_stats"]["installed"] is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n  - {kind: gadget, name: x, distribution: y, description: z}\n")
    result = run_cli("registry", "--path", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: plugins[0].kind: 'gadget' is not one of model_adapter, activation_store, dictionary_learner, analyzer, stage"


def test_notestats_requires_a_data_section(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages: [note_stats]\nnote_stats: {context: 1}\n")
    result = run_cli("validate", str(pipeline))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: note_stats: context must be at least 2, got 1",
        "error: data: required by stage 'note_stats' but missing",
    ]

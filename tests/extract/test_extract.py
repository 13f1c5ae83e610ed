"""The extract stage: coordinates, activations, event filter, the seed command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import music_interpret as mi
from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.representation import encode_song
from music_interpret.interfaces import Batch
from tests.conftest import run_cli
from tests.extract.conftest import write_pipeline


def test_coordinates_match_the_source_notes(tmp_path, fix):
    pipeline = write_pipeline(tmp_path, extract="layers: [1]\nhooks: [resid_mid.0]\nstore: {name: netcdf, shard_tokens: 4000}")
    result = run_cli("run", str(pipeline))
    assert result.returncode == 0, result.stderr
    ds = mi.open_activations(tmp_path / "acts" / "x")
    assert list(ds.hook.values) == ["resid_mid.0", "resid_post.1"]
    assert ds.attrs["n_shards"] > 1 and ds.activations.dtype == np.float32
    notes_dir = fix / "data" / "quartets" / "processed" / "notes"
    names = list(ds.song_name.values)
    assert names == (fix / "data" / "quartets" / "processed" / "names.txt").read_text().split()
    for i, name in enumerate(names):
        notes = np.load(notes_dir / f"{name}.npy")
        song = ds.where(ds.song == i, drop=True)
        et = song.event_type.values
        n_inst = len(np.unique(notes[:, 4]))
        # start-of-song, instruments, start-of-notes, notes, end-of-song: every token once
        assert len(et) == len(notes) + n_inst + 3
        assert et[0] == 0 and (et[1 : 1 + n_inst] == 1).all() and et[1 + n_inst] == 2 and et[-1] == 4
        assert (song.song_token.values == np.arange(len(et))).all()
        nt = song.where(song.event_type == 3, drop=True)
        for col, key in enumerate(["beat", "position", "pitch"]):
            assert (nt[key].values == notes[:, col]).all(), (name, key)
        assert (nt.program.values == notes[:, 4]).all()
        assert (nt.instrument.values > 0).all() and (song.seq_pos.values < 1024).all()
        non_notes = song.where(song.event_type != 3, drop=True)
        assert (non_notes.pitch.values == -1).all() and (non_notes.beat.values == -1).all()
    assert set(np.unique(ds.instrument.where(ds.event_type == 1, drop=True).values)) == {25, 26, 27}
    assert ds.event_type.attrs["flag_meanings"].split()[3] == "note"
    assert "sha256" in ds.attrs["source"] and json.loads(ds.attrs["model_config"])["dim"] == 64


def test_activations_equal_a_direct_forward(tmp_path, fix, device):
    pipeline = write_pipeline(tmp_path, model="rpe-tiny", data="bach",
                              extract="hooks: [resid_pre.0, resid_post.2, final_norm]\nmax_songs: 5\nbatch_size: 3\n"
                                      "store: {name: netcdf, shard_tokens: 200}")
    pipeline.write_text(f"device: {device}\n" + pipeline.read_text())
    assert run_cli("run", str(pipeline)).returncode == 0
    ds = mi.open_activations(tmp_path / "acts" / "x", lazy=False)
    # one shard per song or so: the stage's two reused shard buffers alternate several times
    assert ds.attrs["n_shards"] >= 4
    adapter = MMTAdapter()
    adapter.load(fix / "models" / "bach" / "rpe-tiny")
    for i, name in enumerate(ds.song_name.values):
        codes = encode_song(np.load(fix / "data" / "bach" / "processed" / "notes" / f"{name}.npy"), 256, 1024)
        acts = adapter.run_with_hooks(Batch(torch.from_numpy(codes[None]), torch.ones(1, len(codes), dtype=torch.bool)),
                                      ["resid_pre.0", "resid_post.2", "final_norm"])
        stored = ds.activations.where(ds.song == i, drop=True)
        assert stored.sizes["token"] == len(codes)
        for h, hook in enumerate(["resid_pre.0", "resid_post.2", "final_norm"]):
            np.testing.assert_allclose(stored.values[:, h], acts[hook][0].numpy(), atol=1e-5, rtol=0)


def test_notes_only(tmp_path, fix):
    pipeline = write_pipeline(tmp_path, data="bach", extract="layers: [0]\nevents: notes\nmax_songs: 4")
    assert run_cli("run", str(pipeline)).returncode == 0
    ds = mi.open_activations(tmp_path / "acts" / "x")
    assert set(np.unique(ds.event_type.values)) == {3}
    names = list(ds.song_name.values)
    total = sum(len(np.load(fix / "data" / "bach" / "processed" / "notes" / f"{n}.npy")) for n in names)
    assert ds.sizes["token"] == total


def test_unknown_hook_point_is_one_line(tmp_path):
    """validate and run both refuse a layer the model lacks before anything runs."""
    pipeline = write_pipeline(tmp_path, extract="layers: [7]\nhooks: [resid_mid.5]")
    for command in ("validate", "run"):
        result = run_cli(command, str(pipeline))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "error: extract.layers: layer(s) 7 do not exist (the model has 2 layers: 0-1)",
            "error: extract.hooks: resid_mid.5 do not exist in this model (available: resid_pre.0, "
            "resid_mid.0, resid_post.0, resid_pre.1, resid_mid.1, resid_post.1, final_norm)"]
    assert not (tmp_path / "acts").exists() and not list(tmp_path.glob("**/*.partial"))
    bad = write_pipeline(tmp_path, extract="hooks: [resid_post]", run="y")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2 and "extract: hooks: 'resid_post' is not a hook point name" in result.stderr


def test_seed_command_prints_the_store_and_skips_when_done(tmp_path, fix):
    root = tmp_path / "proj"
    (root / "data" / "base").mkdir(parents=True)
    (root / "models" / "bach").mkdir(parents=True)
    (root / "data" / "base" / "bach_notes").symlink_to(fix / "data" / "bach" / "processed")
    (root / "models" / "bach" / "tiny").symlink_to(fix / "models" / "bach" / "ape-tiny")
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "music_interpret.activation_extraction", "bach", "tiny",
           "--layers", "0", "1", "--root", str(root), "--max-songs", "3"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    store = root / "data" / "activations" / "bach" / "tiny"
    assert first.stdout.strip() == str(store)
    assert (store / "store.json").exists() and (root / "reports" / "bach_tiny" / "manifest.json").exists()
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert "skipped" in second.stderr and second.stdout.strip() == str(store)
    prep = subprocess.run([sys.executable, "-m", "music_interpret.preprocess", "bach", "tiny",
                           "--layers", "0", "1", "--root", str(root)], capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    assert prep.stdout.strip() == str(store / "stats") and (store / "stats" / "stats.nc").exists()
    bad = subprocess.run([sys.executable, "-m", "music_interpret.preprocess", "bach", "tiny",
                          "--layers", "3", "--root", str(root)], capture_output=True, text=True)
    assert bad.returncode == 2 and "hook point 'resid_post.3' was not extracted" in bad.stderr
    missing = subprocess.run([*cmd[:4], "nomodel", "--root", str(root)], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: model.path: no such file or directory: {root / 'models' / 'bach' / 'nomodel'}"


def test_store_reads_back_through_open_mfdataset_parallel(tmp_path):
    pipeline = write_pipeline(tmp_path, extract="layers: [0]\nstore: {name: netcdf, shard_tokens: 2000}")
    assert run_cli("run", str(pipeline)).returncode == 0
    lazy = mi.open_activations(tmp_path / "acts" / "x", parallel=True)
    eager = mi.open_activations(tmp_path / "acts" / "x", lazy=False)
    assert lazy.attrs["n_shards"] == 4  # one shard per ~2000 tokens, songs never split
    assert float(abs(lazy.activations - eager.activations).max().compute()) == 0.0
    assert float(lazy.activations.mean().compute()) == pytest.approx(float(eager.activations.mean()), rel=1e-5)


@pytest.mark.parametrize("slack", [None, 0.0, 0.1, 0.5])
def test_length_batches_cover_every_window_within_budget(slack):
    from music_interpret.stages.extract import length_batches

    rng = np.random.default_rng(0)
    lengths = sorted(rng.integers(5, 1025, 200).tolist(), reverse=True)
    batches = length_batches(lengths, 8, slack)
    assert [i for b in batches for i in range(len(lengths))[b]] == list(range(len(lengths)))
    for b in batches:
        group = lengths[b]
        if slack is None:
            assert len(group) <= 8
            continue
        assert len(group) * group[0] <= 8 * lengths[0]  # the token budget of the longest batch
        assert min(group) >= (1 - slack) * group[0]
    if slack is not None and slack > 0:  # short windows share batches: fewer, fuller batches
        assert len(batches) < len(length_batches(lengths, 8, 0.0))
    assert length_batches([], 8, slack) == []


def test_length_slack_does_not_change_activations(tmp_path, fix):
    """Batching only groups windows: the stored activations are the same within float tolerance."""
    stores = []
    for k, slack in enumerate(["null", "0.5"]):
        out = tmp_path / str(k)
        out.mkdir()
        pipeline = write_pipeline(out, model="rpe-tiny", data="bach",
                                  extract=f"layers: [1]\nmax_songs: 6\nbatch_size: 2\nlength_slack: {slack}")
        assert run_cli("run", str(pipeline)).returncode == 0
        stores.append(mi.open_activations(out / "acts" / "x", lazy=False))
    np.testing.assert_allclose(stores[0].activations.values, stores[1].activations.values, atol=2e-5, rtol=0)
    for name in ("song", "song_token", "event_type", "pitch"):
        assert (stores[0][name].values == stores[1][name].values).all()


def test_shard_buffers_are_not_reused_while_written(tmp_path, fix, monkeypatch):
    """A slow writer must still write each shard's own activations (the stage reuses two buffers)."""
    import time

    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugins import get_registry
    from music_interpret.stores.netcdf import StoreWriter

    registry = get_registry()
    extract = "layers: [0, 1]\nmax_songs: 6\nstore: {name: netcdf, shard_tokens: 300}"

    def run(name: str):
        pipeline = load_pipeline(write_pipeline(tmp_path, data="bach", extract=extract, run=name), registry)
        Engine(pipeline, registry, log=lambda _m: None).run(force=True)
        return mi.open_activations(tmp_path / "acts" / name, lazy=False)

    fast = run("fast")
    write = StoreWriter.write_shard

    def slow_write(self, acts, *args, **kwargs):
        time.sleep(0.3)  # the next shard's forward passes finish meanwhile
        return write(self, acts, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_shard", slow_write)
    slow = run("slow")
    assert slow.attrs["n_shards"] == fast.attrs["n_shards"] >= 3
    np.testing.assert_array_equal(slow.activations.values, fast.activations.values)


def test_forward_workers_give_the_same_store(tmp_path, fix):
    """Batches run on several workers land in the same rows as on one; torch threads are restored."""
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugins import get_registry

    registry = get_registry()
    threads = torch.get_num_threads()
    stores = []
    for workers in (1, 3):
        extract = f"layers: [0, 1]\nmax_songs: 6\nbatch_size: 1\nforward_workers: {workers}\n" \
                  "store: {name: netcdf, shard_tokens: 1000}"
        pipeline = load_pipeline(write_pipeline(tmp_path, data="bach", extract=extract, run=f"w{workers}"), registry)
        summary = Engine(pipeline, registry, log=lambda _m: None).run(force=True)["stages"]["extract"]["summary"]
        assert summary["windows_this_run"] >= 2 * summary["shards"]  # several batches per shard
        assert torch.get_num_threads() == threads
        stores.append(mi.open_activations(tmp_path / "acts" / f"w{workers}", lazy=False))
    one, many = stores
    assert one.attrs["n_shards"] == many.attrs["n_shards"] >= 2
    np.testing.assert_allclose(many.activations.values, one.activations.values, atol=2e-5, rtol=0)
    for name in ("song", "song_token", "seq_pos", "event_type", "pitch", "window"):
        assert (one[name].values == many[name].values).all()


def test_plan_workers_give_the_same_store(tmp_path, fix, monkeypatch):
    """Songs planned on worker processes (chunks of songs, spawned) give the same store."""
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugins import get_registry
    from music_interpret.stages import extract_plan

    monkeypatch.setattr(extract_plan, "CHUNK_SONGS", 5)  # 12 songs: 3 chunks over 2 workers
    registry = get_registry()
    stores = []
    for workers in (0, 2):
        extract = f"layers: [1]\nmax_songs: 12\nevents: notes\nplan_workers: {workers}\n" \
                  "forward_workers: 1\nstore: {name: netcdf, shard_tokens: 300}"
        pipeline = load_pipeline(write_pipeline(tmp_path, data="bach", extract=extract, run=f"p{workers}"), registry)
        Engine(pipeline, registry, log=lambda _m: None).run(force=True)
        stores.append(tmp_path / "acts" / f"p{workers}")
    here, there = (json.loads((s / "store.json").read_text())["shards"] for s in stores)
    assert [(s["song_start"], s["song_stop"], s["tokens"]) for s in here] == \
        [(s["song_start"], s["song_stop"], s["tokens"]) for s in there] and len(here) >= 3
    a, b = (mi.open_activations(s, lazy=False) for s in stores)
    assert np.array_equal(a.activations.values, b.activations.values)
    for name in a.coords:
        assert np.array_equal(a[name].values, b[name].values), name


def test_forward_workers_must_be_positive(tmp_path):
    pipeline = write_pipeline(tmp_path, extract="layers: [0]\nforward_workers: 0")
    result = run_cli("run", str(pipeline))
    assert result.returncode != 0 and "forward_workers" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_shuffled_song_order_is_seeded(tmp_path, fix):
    orders = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        pipeline = write_pipeline(tmp_path, data="bach", run=run,
                                  extract="layers: [0]\nshuffle_songs: true\nmax_songs: 6")
        pipeline.write_text(f"seed: {seed}\n" + pipeline.read_text())
        assert run_cli("run", str(pipeline)).returncode == 0
        orders.append(list(mi.open_activations(tmp_path / "acts" / run).song_name.values))
    assert orders[0] == orders[1] != orders[2]
    names = (fix / "data" / "bach" / "processed" / "names.txt").read_text().split()
    assert orders[0] != names[:6] and set(orders[0]) <= set(names)

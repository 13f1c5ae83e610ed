"""``torchrun -m music_interpret run``: two gloo ranks on CPU against one process.

Extraction splits the songs over the ranks and writes the shards one process would
(same boundaries, same tokens, same values); training runs data-parallel on the same
global batches; stages that are not distributed run on rank 0 alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import music_interpret as mi
from music_interpret.stages.extract import cut_shards
from music_interpret.stores.netcdf import NetCDFStore, NetCDFStoreConfig, part_manifest

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "mmt"
MODEL = FIX / "models" / "bach" / "rpe-tiny"
DATA = FIX / "data" / "bach" / "processed"


def _pipeline(tmp: Path, run: str) -> Path:
    path = tmp / f"{run}.yaml"
    path.write_text(textwrap.dedent(f"""
        run: {run}
        output_dir: {tmp / 'reports'}
        device: cpu
        stages: [extract, preprocess, train]
        model: {{path: {MODEL}}}
        data: {{path: {DATA}}}
        extract:
          hooks: [resid_post.0, resid_post.1]
          max_songs: 12
          output: {tmp / 'acts' / run}
          store: {{name: netcdf, shard_tokens: 400}}
        train:
          learner: {{name: relu_l1, d_sae: 32, lr: 0.003, batch_size: 128}}
          hooks: [resid_post.1]
          steps: 30
          log_every: 10
          holdout_fraction: 0.25
          downstream: off
    """))
    return path


def _torchrun(pipeline: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "music_interpret", "run", str(pipeline), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The same pipeline in one process and under torchrun with two ranks."""
    tmp = tmp_path_factory.mktemp("torchrun")
    single = subprocess.run([sys.executable, "-m", "music_interpret", "run", str(_pipeline(tmp, "one"))],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    ranked = _torchrun(_pipeline(tmp, "two"))
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    return tmp, tmp / "reports", ranked.stdout + ranked.stderr


def test_ranks_write_the_store_one_process_writes(runs: tuple[Path, Path, str]) -> None:
    tmp, _, _ = runs
    one, two = tmp / "acts" / "one", tmp / "acts" / "two"
    m1, m2 = (json.loads((p / "store.json").read_text()) for p in (one, two))
    assert m2["complete"] and m2["summary"]["ranks"] == 2
    assert len(m1["shards"]) >= 4  # several shards, so both ranks wrote some
    for key in ("tokens", "token_start", "song_start", "song_stop", "file"):
        assert [s[key] for s in m1["shards"]] == [s[key] for s in m2["shards"]], key
    assert not list(two.glob(".store.rank-*")) and not list(two.glob(".*.tmp"))
    a = mi.open_activations(one, lazy=False)
    b = mi.open_activations(two, lazy=False)
    assert a.sizes == b.sizes
    np.testing.assert_allclose(b.activations.values, a.activations.values, rtol=1e-5, atol=1e-5)
    for name in a.coords:
        assert np.array_equal(a[name].values, b[name].values), name
    from music_interpret.stores import open_store

    open_store(two, verify=True)  # every shard's checksum holds


def test_train_is_data_parallel_and_matches_one_process(runs: tuple[Path, Path, str]) -> None:
    _, reports, _ = runs
    d1 = mi.load_dictionary(reports / "one" / "train" / "dictionaries" / "resid_post.1")
    d2 = mi.load_dictionary(reports / "two" / "train" / "dictionaries" / "resid_post.1")
    for key, value in d1.state_dict().items():
        other = d2.state_dict()[key]
        assert np.allclose(other.numpy(), value.numpy(), atol=1e-4, rtol=1e-3), \
            (key, float(abs(other - value).max()))
    manifest = json.loads((reports / "two" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["stages"]["train"]["summary"]["ranks"] == 2
    assert manifest["stages"]["preprocess"]["status"] == "done"  # rank 0 ran it alone
    assert "ranks" not in manifest["stages"]["preprocess"]["summary"]


def test_a_second_torchrun_skips_what_is_done(runs: tuple[Path, Path, str]) -> None:
    tmp, _, _ = runs
    again = _torchrun(tmp / "two.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped (output up to date") == 3
    assert "complete: 0 stage(s) run, 3 skipped" in again.stdout


def test_a_bad_override_stops_every_rank_with_one_line(runs: tuple[Path, Path, str]) -> None:
    tmp, _, _ = runs
    bad = _torchrun(tmp / "two.yaml", "--set", "train.steps=0")
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and all("steps must be positive" in line for line in lines), lines
    assert "music_interpret/" not in bad.stderr  # torchrun reports the failure, we print no traceback


def test_rank_0_refusing_the_run_stops_the_other_rank(runs: tuple[Path, Path, str]) -> None:
    tmp, _, _ = runs
    bad = _torchrun(tmp / "two.yaml", "--set", "extract.layers=[7]")  # found by rank 0's checks
    assert bad.returncode != 0
    assert "error: extract.layers: layer(s) 7 do not exist" in bad.stderr
    assert "error: rank 1: rank 0 stopped the run" in bad.stderr
    assert "music_interpret/" not in bad.stderr


def test_cut_shards_follows_the_single_process_rule() -> None:
    shards = cut_shards([5, 0, 7, 3, 9, 1], 8)
    assert [(s.song_start, s.song_stop, s.token_start, s.tokens) for s in shards] == \
        [(0, 3, 0, 12), (3, 5, 12, 12), (5, 6, 24, 1)]
    assert [s.song_stop for s in cut_shards([4, 4], 1)] == [1, 2]  # at least one song each
    assert [s.song_stop for s in cut_shards([0, 0, 3], 1)] == [3]  # empty songs join the next
    assert cut_shards([], 5) == []


def test_join_keeps_the_complete_run_of_shards(tmp_path: Path) -> None:
    """Rank writers' shards are joined up to the first missing one; later files go."""
    store = NetCDFStore(NetCDFStoreConfig(shard_tokens=2))
    vocab = {"instrument_names": ["piano"]}
    songs = [f"s{i}" for i in range(4)]
    root = store.create(tmp_path / "s", hooks=["h"], d_model=3, songs=songs, sources=songs, attrs=vocab)
    coords = {name: np.zeros(2, np.int64) for name in _coord_names()}
    parts = [store.attach(tmp_path / "s", rank) for rank in range(2)]
    acts = np.ones((2, 1, 3), np.float32)
    parts[0].write_shard(acts, coords, 0, 1, index=0, token_start=0)
    parts[1].write_shard(acts, coords, 1, 2, index=1, token_start=2)
    parts[1].write_shard(acts, coords, 3, 4, index=3, token_start=6)  # shard 2 is missing
    assert (tmp_path / "s" / part_manifest(1)).exists()
    root.join_parts()
    assert [s["file"] for s in root.manifest["shards"]] == ["shard-00000.nc", "shard-00001.nc"]
    assert root.next_song == 2 and root.n_tokens == 4
    assert not (tmp_path / "s" / "shard-00003.nc").exists()
    assert not list((tmp_path / "s").glob(".store.rank-*"))
    # an interrupted run's parts are joined when the store is opened again
    parts[1].manifest["shards"].clear()
    parts[1].write_shard(acts, coords, 2, 3, index=2, token_start=4)
    again = store.create(tmp_path / "s", hooks=["h"], d_model=3, songs=songs, sources=songs, attrs=vocab)
    assert again.next_song == 3 and again.n_shards == 3


def _coord_names() -> list[str]:
    from music_interpret.stores.schema import TOKEN_COORDS

    return list(TOKEN_COORDS)


def test_default_plan_workers_share_the_cpus_between_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from music_interpret.stages import extract_plan

    monkeypatch.setattr(extract_plan.os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert extract_plan.default_plan_workers("cpu") == 0
    assert extract_plan.default_plan_workers("cuda") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert extract_plan.default_plan_workers("cuda:1") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert extract_plan.default_plan_workers("cuda") == 1

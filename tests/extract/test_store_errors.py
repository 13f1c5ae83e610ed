"""Broken stores give one-line errors naming the file."""

from __future__ import annotations

import json
import shutil

import netCDF4
import pytest

import music_interpret as mi
from music_interpret.errors import UserError
from tests.conftest import run_cli
from tests.extract.conftest import write_pipeline


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    pipeline = write_pipeline(tmp, data="bach", extract="layers: [0]\nmax_songs: 6\nstore: {name: netcdf, shard_tokens: 600}")
    assert run_cli("run", str(pipeline)).returncode == 0
    return tmp / "acts" / "x"


@pytest.fixture
def copy(store, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(store, dst)
    return dst


def expect(path, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        mi.open_activations(path)
    assert "\n" not in str(info.value)


def test_truncated_shard(copy):
    shard = copy / "shard-00001.nc"
    shard.write_bytes(shard.read_bytes()[:5000])
    expect(copy, r"shard-00001.nc: corrupt or truncated shard")


def test_garbage_shard(copy):
    (copy / "shard-00000.nc").write_bytes(b"not a netcdf file at all" * 100)
    expect(copy, r"shard-00000.nc: corrupt or truncated shard")


def test_foreign_shard(copy, store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store, other)
    manifest = json.loads((other / "store.json").read_text())
    with netCDF4.Dataset(other / "shard-00000.nc", "a") as nc:
        nc.setncattr("store_id", "0" * 32)
    shutil.copy(other / "shard-00000.nc", copy / "shard-00000.nc")
    expect(copy, r"shard-00000.nc: shard belongs to another store")
    assert manifest["store_id"] != "0" * 32


def test_hooks_and_d_model_disagree(copy):
    with netCDF4.Dataset(copy / "shard-00002.nc", "a") as nc:
        nc.setncattr("hook_points", "resid_post.1")
    expect(copy, r"shard-00002.nc: hook points \['resid_post.1'\] disagree")


def test_missing_shard_and_manifest(copy, tmp_path):
    (copy / "shard-00001.nc").unlink()
    expect(copy, r"shard-00001.nc: shard listed in store.json is missing")
    expect(tmp_path / "nowhere", r"activation store folder not found")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", r"not an activation store \(no store.json\)")


def test_incomplete_store(copy):
    manifest = json.loads((copy / "store.json").read_text())
    manifest["complete"] = False
    (copy / "store.json").write_text(json.dumps(manifest))
    expect(copy, r"the store is incomplete")


def test_hook_not_extracted(store):
    with pytest.raises(UserError, match=r"hook point 'resid_post.1' was not extracted \(extracted: resid_post.0\)"):
        mi.open_activations(store, hooks=["resid_post.1"])


def test_d_model_disagrees(copy, tmp_path):
    import numpy as np

    from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, check_store

    manifest = json.loads((copy / "store.json").read_text())
    info = check_store(copy)
    writer = NetCDFStore().create(tmp_path / "narrow", hooks=manifest["hooks"], d_model=8,
                                  songs=info.songs, sources=info.song_sources, attrs={})
    n = manifest["shards"][0]["tokens"]
    shard = writer.write_shard(np.zeros((n, 1, 8), np.float32),
                               {k: np.zeros(n, np.int64) for k in TOKEN_COORDS}, 0, 1)
    with netCDF4.Dataset(shard, "a") as nc:
        nc.setncattr("store_id", manifest["store_id"])
    shutil.copy(shard, copy / "shard-00000.nc")
    expect(copy, r"shard-00000.nc: d_model 8 disagrees with the store's 64")

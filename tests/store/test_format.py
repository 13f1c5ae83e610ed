"""Store format 2: plain xarray reads the shards, stored dtypes, format-1 stores still read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import music_interpret as mi
from music_interpret.loader import ActivationLoader
from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig, check_store
from tests.store import HOOKS, coords_for, make_store, synthetic

ROOT = Path(__file__).resolve().parents[2]
V1 = ROOT / "tests" / "fixtures" / "store_v1"
NAMES = ["", "piano", "violin"]


def write(path: Path, acts: np.ndarray, sizes: list[int], dtype: str = "float32",
          layout: str = "chunked") -> Path:
    songs = [f"song {i}" for i in range(2 * len(sizes))]
    writer = NetCDFStore(NetCDFStoreConfig(chunk_tokens=64, layout=layout)).create(
        path, hooks=list(HOOKS), d_model=acts.shape[2], songs=songs, sources=[f"src/{s}" for s in songs],
        attrs={"instrument_names": NAMES}, resume=False, dtype=dtype)
    start = 0
    for k, n in enumerate(sizes):
        writer.write_shard(acts[start : start + n], coords_for(n, 2 * k, seed=k), 2 * k, 2 * k + 2)
        start += n
    writer.finish()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, np.ndarray]:
    acts = synthetic(700, 8)
    return write(tmp_path_factory.mktemp("fmt") / "s", acts, [300, 250, 150]), acts


def test_plain_open_mfdataset_is_open_activations(store) -> None:
    path, acts = store
    plain = xr.open_mfdataset(str(path / "shard-*.nc"))  # default arguments, default engine
    ours = mi.open_activations(path)
    xr.testing.assert_equal(plain, ours.drop_vars(["song_name", "song_source"]))
    for name in plain.variables:
        xr.testing.assert_identical(plain[name].variable, ours[name].variable)
    assert plain.token.dtype == np.int64 and np.array_equal(plain.token, np.arange(700))
    assert set(TOKEN_COORDS) <= set(plain.coords)
    assert np.array_equal(plain.activations.values, acts)
    assert list(ours.song_name.values) == [f"song {i}" for i in range(6)]


def test_cf_attributes(store) -> None:
    path, _ = store
    ds = xr.open_dataset(path / "shard-00001.nc")
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert int(ds.token[0]) == 300
    assert ds.activations.attrs["units"] == "1"
    assert ds.event_type.attrs["flag_meanings"].split()[3] == "note"
    assert list(ds.instrument.attrs["flag_values"]) == [1, 2]
    assert ds.instrument.attrs["flag_meanings"] == "piano violin"
    assert ds.pitch.attrs["valid_min"] == 0 and ds.pitch.attrs["valid_max"] == 127
    assert ds.pitch.dtype == np.int16  # -1 kept as an integer, not masked
    assert "song_name" not in ds and "songs" not in ds.dims
    songs = xr.open_dataset(path / "songs.nc")
    assert list(songs.song_source.values)[:2] == ["src/song 0", "src/song 1"]
    manifest = json.loads((path / "store.json").read_text())
    assert "songs" not in manifest and manifest["n_songs"] == 6 and manifest["format_version"] == 2


def test_parallel_and_distributed(store) -> None:
    path, acts = store
    # parallel opening goes through h5netcdf: netCDF4's engine is not safe to open from
    # several threads at once (it can crash the process), so the store never asks for it
    ds = xr.open_mfdataset(str(path / "shard-*.nc"), engine="h5netcdf", parallel=True)
    assert np.allclose(ds.activations.mean("token").values, acts.mean(0), atol=1e-4)
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None):
        lazy = mi.open_activations(path, parallel=True)
        got = lazy.activations.sel(hook=HOOKS[1]).where(lazy.event_type == 3).mean("token").compute()
    want = acts[:, 1][lazy.event_type.values == 3].mean(0)
    assert np.allclose(got.values, want, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_stored_dtype_reads_back_as_float32(tmp_path, dtype, tol) -> None:
    acts = synthetic(500, 8)
    acts[:, :, 0] /= 100  # keep the marker dimension in a typical range
    path = write(tmp_path / dtype, acts, [320, 180], dtype=dtype)
    bound = tol * np.abs(acts) + 1e-7
    ds = mi.open_activations(path)
    assert ds.activations.dtype == np.float32 and ds.activations.attrs["music_interpret_stored_dtype"] == dtype
    assert (np.abs(ds.activations.values - acts) <= bound).all()
    eager = mi.open_activations(path, lazy=False)
    assert np.array_equal(eager.activations.values, ds.activations.values)
    mapped = ActivationLoader(path, HOOKS[1], 128, shuffle=False)
    pooled = ActivationLoader(path, HOOKS[1], 128, shuffle=False, mmap=False)
    assert mapped.mapped
    got = np.concatenate([b.numpy() for b in mapped])
    assert got.dtype == np.float32
    assert np.array_equal(got, np.concatenate([b.numpy() for b in pooled]))
    assert np.array_equal(got, ds.activations.sel(hook=HOOKS[1]).values)
    shuffled = ActivationLoader(path, HOOKS[1], 100, seed=3, shuffle_run=4)
    ref = ActivationLoader(path, HOOKS[1], 100, seed=3, shuffle_run=4, mmap=False)
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, ref, strict=True))
    plain = xr.open_dataset(path / "shard-00000.nc")
    assert "activations" not in plain and plain.activation_bits.dtype == np.uint16
    import h5py

    with h5py.File(path / "shard-00000.nc", "r") as f:  # half the bytes of float32
        assert f["activation_bits"].id.get_storage_size() == 320 * 2 * 8 * 2


def test_float16_refuses_out_of_range(tmp_path) -> None:
    from music_interpret.errors import UserError

    acts = synthetic(50, 8)
    acts[3, 0, 2] = 1e5
    with pytest.raises(UserError, match=r"shard-00000.nc: activations reach \|x\| = 1e\+05, beyond float16"):
        write(tmp_path / "s", acts, [50], dtype="float16")


def test_format_1_store_still_reads(tmp_path) -> None:
    copy = tmp_path / "v1"
    shutil.copytree(V1, copy)
    info = check_store(copy)
    assert info.format_version == 1 and info.songs == ["song_a", "song b", "song-c"]
    ds = mi.open_activations(copy)
    assert ds.token.dtype == np.int64 and np.array_equal(ds.token, np.arange(64))
    assert list(ds.song_name.values) == info.songs and "song_name" in ds.coords
    assert ds.sizes["songs"] == 3 and set(TOKEN_COORDS) <= set(ds.coords)
    eager = mi.open_activations(copy, lazy=False)
    xr.testing.assert_identical(ds.compute(), eager)
    for mmap in (True, False):
        loader = ActivationLoader(copy, "resid_post.1", 16, shuffle=False, mmap=mmap)
        got = np.concatenate([b.numpy() for b in loader])
        assert np.array_equal(got, ds.activations.sel(hook="resid_post.1").values)


def test_one_hdf5_library_in_a_training_process(store) -> None:
    """Opening, checking and loading a store never imports netCDF4 (netCDF-C's own HDF5)."""
    path, _ = store
    code = (f"import sys, music_interpret as mi\n"
            f"from music_interpret.loader import ActivationLoader\n"
            f"ds = mi.open_activations({str(path)!r}); ds.activations.sum().compute()\n"
            f"sum(len(b) for b in ActivationLoader({str(path)!r}, {HOOKS[0]!r}, 64, mmap=False))\n"
            f"assert 'netCDF4' not in sys.modules, 'netCDF4 was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_contiguous_layout_and_small_shards(tmp_path) -> None:
    acts = synthetic(90, 8)
    path, _ = make_store(tmp_path / "c", acts, [40, 50], chunk_tokens=64, layout="contiguous")
    plain = xr.open_mfdataset(str(path / "shard-*.nc"))
    assert np.array_equal(plain.activations.values, acts)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gatherer_modes_agree(dtype) -> None:
    import torch

    from music_interpret.gather import PROBES, Gatherer

    rows = torch.randn(300, 4096).to(getattr(torch, dtype))
    index = torch.randint(0, 300, (101,))
    shift, scale = torch.randn(4096), torch.rand(4096) + 0.5
    want = (rows[index].float() - shift) * scale
    for mode in ("whole", "pool", "auto"):
        gather = Gatherer(4096, rows.dtype, threads=3, mode=mode)  # pieces of 8 rows, 3 parts
        for _ in range(2 * PROBES + 1):
            dest = torch.empty(101, 4096)
            gather(rows, index, dest, shift, scale)
            assert torch.equal(dest, want), mode
        gather(rows, index, dest)
        assert torch.equal(dest, rows[index].float())
        assert gather.chosen in ("whole", "pool")
        gather.close()
